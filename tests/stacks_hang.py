"""A 2-rank script that hangs on purpose (tests/test_stacks.py): rank 1 sleeps, rank 0 waits for it in a barrier."""
import time

import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 1:
    print("rank 1 sleeping", flush=True)
    time.sleep(600)  # rank 1 hangs here
print(f"rank {dist.get_rank()} at the barrier", flush=True)
dist.barrier()  # rank 0 waits here
