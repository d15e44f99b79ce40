"""The tools' one GPU timer: CUDA events around each run, the median of the runs after warm-up."""
import statistics

import torch


def cuda_time(fn, runs, warmup=1, graph=0, before=None):
    """Median milliseconds of one fn() call over `runs` timed runs (CUDA events), after `warmup`
    untimed calls (compilation, autotuning, allocator growth).
    graph=n: fn() is captured n times into one CUDA graph and each run replays the graph, so no
    Python or launch gaps sit between the kernels (as a decode step runs); the time is per call.
    before: called ahead of each run, outside the timed span (l2_flusher(), say)."""
    run, calls = fn, 1
    if graph:
        side = torch.cuda.Stream()                      # warm up off the stream that captures
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(graph):
                fn()
        g.replay()                                      # the first replay uploads the graph
        run, calls = g.replay, graph
    else:
        for _ in range(warmup):
            fn()
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def l2_flusher(device="cuda"):
    """A function that evicts the GPU's L2 cache by writing 256 MB (several times any L2), for
    cuda_time's `before`: each timed run then reads its inputs from memory, as a model's layer
    reads weights and states that other layers have pushed out of the cache."""
    buf = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    return buf.zero_
