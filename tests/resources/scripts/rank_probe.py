"""A rank for the resource tests (plain Python, no torch): reports where it runs, then MODE.

Writes ``$OUT_DIR/rank<RANK>.json`` (pid, OMP_NUM_THREADS, its cgroups), then:

- ``hold``: waits until ``$OUT_DIR/release`` exists;
- ``oom``: rank 1 allocates until the OOM killer stops it; rank 0 starts a grandchild in
  its own session (out of reach of the rank's process group, ``grandchild.pid``) and sleeps;
- ``burn``: spins for 0.5 s of CPU time; rank ``$FAIL_RANK`` then exits with code 3.
"""

import json
import os
import subprocess
import sys
import time

rank = int(os.environ["RANK"])
out = os.environ["OUT_DIR"]
mode = os.environ.get("MODE", "hold")
with open(f"/proc/{os.getpid()}/cgroup") as f:
    cgroups = f.read().splitlines()
info = {"pid": os.getpid(), "omp": os.environ.get("OMP_NUM_THREADS"), "cgroups": cgroups,
        "plan_env_left": "AITRAIN_RANK_PLAN" in os.environ}
with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as f:
    json.dump(info, f)
os.rename(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))
print(f"rank {rank} ready", flush=True)

if mode == "hold":
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(out, "release")) and time.monotonic() < deadline:
        time.sleep(0.05)
elif mode == "oom":
    if rank == 1:
        deadline = time.monotonic() + 30  # rank 0 has started its grandchild first
        while not os.path.exists(os.path.join(out, "grandchild.pid")) and time.monotonic() < deadline:
            time.sleep(0.05)
        chunks = []
        for _ in range(200):  # 5 GB at most; the limit stops it long before
            chunks.append(b"\x01" * (25 << 20))
        print("rank 1 was not stopped", flush=True)
        sys.exit(0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    with open(os.path.join(out, "grandchild.pid.tmp"), "w") as f:
        f.write(str(child.pid))
    os.rename(os.path.join(out, "grandchild.pid.tmp"), os.path.join(out, "grandchild.pid"))
    time.sleep(60)
elif mode == "burn":
    t0 = time.process_time()
    while time.process_time() - t0 < 0.5:  # CPU time: the same work on a busy machine
        sum(range(1000))
    sys.exit(3 if rank == int(os.environ.get("FAIL_RANK", "-1")) else 0)
