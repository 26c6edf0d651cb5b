"""What bare torchrun is compared with: init the process group, one DDP step, print the time."""
import json
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 10))
model(torch.randn(8, 64)).sum().backward()
if dist.get_rank() == 0:
    print(json.dumps({"first_step_time": time.time()}), flush=True)

dist.barrier()  # without it gloo can abort in teardown (std::terminate) while a peer is mid-collective
dist.destroy_process_group()
