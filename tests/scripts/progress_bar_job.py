"""A rank that draws a progress bar the way tqdm does (``\\r`` + state on stderr, a newline at
the end), for the console tests. UPDATES=15 UPDATE_SLEEP=0.1: the updates and the pause
between them."""

import os
import sys
import time

updates = int(os.environ.get("UPDATES", "15"))
pause = float(os.environ.get("UPDATE_SLEEP", "0.1"))
rank = os.environ.get("RANK", "0")
print(f"rank {rank} starts", flush=True)
for i in range(1, updates + 1):
    sys.stderr.write(f"\rtraining: {i}/{updates} steps")
    sys.stderr.flush()
    time.sleep(pause)
sys.stderr.write("\n")
sys.stderr.flush()
print(f"rank {rank} done", flush=True)
