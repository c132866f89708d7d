import torch

# The test machine is small and shared: one intra-op thread avoids OpenMP oversubscription, which
# made tiny element-wise ops ~50x slower under load.
torch.set_num_threads(1)
