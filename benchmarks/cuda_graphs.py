"""A benchmark step captured in a CUDA graph (shared by the attention benchmarks)."""
import torch


def capture(step, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Run ``step`` ``warmup`` times on a side stream (compiles, allocator pools), then capture
    one call. Raises whatever the capture raises (a backend that syncs, allocates on the host...)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
