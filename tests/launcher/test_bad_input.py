"""Bad input to `aitrain launch`: one `aitrain: error:` line with a HINT, exit code 2, never a
traceback, nothing written, whoever finds it (aitrain's checks, Hydra, OmegaConf)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitrain_testing import run_aitrain

# Values a rank would have tripped over, found before any process starts.
REFUSED = [
    ("train.steps=-5", "train.steps=-5 is below 1"),
    ("train.steps=0", "train.steps=0 is below 1"),
    ("model.n_head=0", "model.n_head=0 is below 1"),
    ("train.log_every=0", "train.log_every=0 is below 1"),
    ("train.lr=nan", "train.lr=nan is not a positive finite"),
    ("train.lr=-1", "is not a positive finite"),
    ("model.dropout=1.5", "model.dropout=1.5 is not in [0, 1)"),
    ("resume=/no/such/checkpoint", "resume=/no/such/checkpoint: no such checkpoint"),
    ("train.steps=abc", "could not be converted to Integer"),
    ("strategy=nope", "Available options in 'strategy': ddp, fsdp"),
    ("nproc_per_node=0", "gives no ranks"),
]


# The real launch goes through Hydra's own run (its errors too), the dry run through compose.
CASES = [(o, m, True) for o, m in REFUSED] + [(o, m, False) for o, m in REFUSED
                                               if o.split("=")[0] in ("train.steps", "strategy", "resume")]


@pytest.mark.parametrize("override, message, dry_run", CASES)
def test_refused_before_anything_starts(tmp_path: Path, override: str, message: str, dry_run: bool) -> None:
    args = ["launch", "tracking=none", "fabric=off", f"run_root={tmp_path / 'runs'}", override]
    r = run_aitrain(args + (["dry_run=true"] if dry_run else []), tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "HINT: " in r.stderr, r.stderr
    assert r.stderr.count("aitrain: error:") == 1 and "Traceback" not in r.stderr, r.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.rglob("rank*.log")), "a rank started"


def test_run_dir_that_cannot_be_created(tmp_path: Path) -> None:
    r = run_aitrain(["launch", "tracking=none", "run_root=/proc/aitrain-x"], tmp_path, timeout=60)
    assert r.returncode == 2
    assert "aitrain: error: cannot create the run directory /proc/aitrain-x" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# Keys of every type in the schema, with values of every shape.
KEYS = ["train.steps", "train.lr", "train.log_every", "model.n_head", "model.d_model", "nproc_per_node", "nnodes",
        "tracking.run_name", "fabric.env.MY_VAR", "log.ranks", "resume", "strategy.mixed_precision", "binding",
        "checkpoint.every_n_steps", "watchdog.timeout_s", "device"]
VALUES = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "null", "true", "''", "[]", "[1,2]", "{a: 1}", "${oc.env:HOME}",
                     "$(touch /tmp/aitrain-pwned)", "`id`", "a;b", "é漢字", "\u202e", "auto", "gpu", "-0"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30),
)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var, sub in (("XDG_CACHE_HOME", "cache"), ("XDG_STATE_HOME", "state"), ("HOME", "home")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return tmp_path


def _dry_run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    from aitrain.launcher.cli import main

    t0 = time.monotonic()
    try:
        code = main(["launch", "dry_run=true", "fabric=off", "tracking=none", *args])
    except SystemExit as e:  # Hydra's own exits (none expected: every error goes through aitrain's)
        code = e.code if isinstance(e.code, int) else 1
    elapsed = time.monotonic() - t0
    return code, capsys.readouterr().err, elapsed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_fuzzed_overrides_never_traceback(isolated: Path, capsys: pytest.CaptureFixture[str],
                                          pairs: list[tuple[str, str]]) -> None:
    before = set(os.listdir(isolated))
    code, err, elapsed = _dry_run([f"{k}={v}" for k, v in pairs], capsys)
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code:
        assert err.count("aitrain: error:") == 1 and "HINT: " in err, err
    assert elapsed < 5, f"{elapsed:.1f}s for {pairs}"
    assert set(os.listdir(isolated)) == before  # a dry run writes nothing
    assert not Path("/tmp/aitrain-pwned").exists()


def test_long_values_take_linear_time(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 100,000-character value (and a secret-named one, which is redacted) in a dry run."""
    times = {}
    for n in (10_000, 100_000):
        code, err, elapsed = _dry_run([f"fabric.env.LONG={'x' * n}", f"fabric.env.DB_PASSWORD={'y' * n}",
                                       f"tracking.run_name={'z' * n}"], capsys)
        assert code in (0, 2) and "Traceback" not in err, err
        times[n] = elapsed
    assert times[100_000] < 5, times
    assert times[100_000] < 10 * times[10_000] + 1.0, times


@pytest.mark.parametrize("bad", ["strategy=nope", "train.steps=abc", "fabric.env.X=[unclosed"])
def test_errors_do_not_print_secrets(tmp_path: Path, bad: str) -> None:
    r = run_aitrain(["launch", "dry_run=true", "fabric=off", "fabric.env.DB_PASSWORD=hunter2", bad], tmp_path,
                    timeout=60)
    assert r.returncode == 2 and "aitrain: error:" in r.stderr, r.stderr
    assert "hunter2" not in r.stderr + r.stdout
