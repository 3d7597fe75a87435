"""Redaction: secret-looking names and URI credentials, everywhere aitrain records or prints."""

from __future__ import annotations

import pytest

from aitrain.launcher.redact import (
    MASK,
    is_secret_name,
    redact_argv,
    redact_mapping,
    redact_obj,
    redact_text,
    redact_uri,
    redact_value,
)


@pytest.mark.parametrize("name", ["HF_TOKEN", "GITHUB_TOKEN", "api_key", "OPENAI_API_KEY", "apiKey", "hfToken",
                                  "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "db_passwd", "GOOGLE_APPLICATION_CREDENTIALS",
                                  "client_secret", "fabric.env.WANDB_API_KEY", "ssh-key", "KEY", "token"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["tokenizer", "tokens_per_s", "train.max_tokens", "NCCL_IB_PKEY", "monkey",
                                  "NCCL_SOCKET_IFNAME", "train.lr", "keyboard", "OMP_NUM_THREADS"])
def test_innocent_names(name: str) -> None:
    assert not is_secret_name(name)


def test_uri_credentials() -> None:
    assert redact_uri("http://bob:hunter2@mlflow:5000/x") == "http://***@mlflow:5000/x"
    assert redact_uri("postgresql://u:p@db.example/mlflow?sslmode=require") == "postgresql://***@db.example/mlflow?sslmode=require"
    assert redact_uri("https://ghp_abc123@github.com/org/repo.git") == "https://***@github.com/org/repo.git"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_uri("see s3://AKIA:xyz@bucket/path and http://h") == "see s3://***@bucket/path and http://h"


def test_values_by_name_and_by_content() -> None:
    assert redact_value("HF_TOKEN", "hf_abc") == MASK
    assert redact_value("MLFLOW_TRACKING_URI", "http://u:p@h:1") == "http://***@h:1"
    assert redact_value("train.steps", 5) == 5
    assert redact_mapping({"A_SECRET": "x", "B": "y"}) == {"A_SECRET": MASK, "B": "y"}


def test_free_text_and_command_lines() -> None:
    assert redact_text("url?token=abc&x=1") == f"url?token={MASK}&x=1"
    assert redact_text("HF_TOKEN=abc python x.py") == f"HF_TOKEN={MASK} python x.py"
    argv = ["aitrain", "launch", "fabric.env.HF_TOKEN=abc", "++fabric.env.MY_PASSWORD=p", "--password", "pw",
            "--api-key=zz", "tracking.uri=http://u:p@host:5000", "train.lr=0.1"]
    assert redact_argv(argv) == ["aitrain", "launch", f"fabric.env.HF_TOKEN={MASK}", f"++fabric.env.MY_PASSWORD={MASK}",
                                 "--password", MASK, f"--api-key={MASK}", "tracking.uri=http://***@host:5000",
                                 "train.lr=0.1"]


def test_documents_recursively() -> None:
    doc = {"env": {"HF_TOKEN": {"value": "abc", "source": "user-set (fabric.env)"},
                   "NCCL_SOCKET_IFNAME": {"value": "ib0", "source": "tuned: RDMA"},
                   "MLFLOW_TRACKING_URI": {"value": "https://u:p@h", "source": "shell"}},
           "list": [{"name": "DB_PASSWORD", "value": "pw"}, {"name": "X", "value": "ok"}],
           "secrets": {"a": "b", "nested": {"c": "d"}}}
    out = redact_obj(doc)
    assert out["env"]["HF_TOKEN"] == {"value": MASK, "source": "user-set (fabric.env)"}
    assert out["env"]["NCCL_SOCKET_IFNAME"]["value"] == "ib0"
    assert out["env"]["MLFLOW_TRACKING_URI"]["value"] == "https://***@h"
    assert out["list"] == [{"name": "DB_PASSWORD", "value": MASK}, {"name": "X", "value": "ok"}]
    assert out["secrets"] == {"a": MASK, "nested": {"c": MASK}}
