"""Training throughput: JPEG files to optimizer step, against the same steps on in-memory input.

    python benchmarks/train_throughput.py [--data DIR] [--size 224] [--batch 128] [--steps 30]

Prints one JSON object: e2e_img_s (files read by loader workers, decoded and augmented on the
device: nvJPEG on CUDA, two batches ahead by a prefetch thread on its own stream that decodes and
augments in turn), synthetic_img_s (a fixed batch already on the device), and ratio = e2e /
synthetic (goal on a GPU machine: >= 0.85); plain_torch_img_s, the same model in a plain PyTorch
loop (AMP bf16 on CUDA, channels_last, SGD) on the same batch, and synthetic_vs_plain (goal >=
0.9); e2e_thread_per_step_img_s, the e2e steps with a prefetch thread for each input step (decode,
augment: the default until stop 25);
e2e_inline_img_s, with the input prepared inline instead; e2e_short_switch_img_s, the e2e steps
with the interpreter's switch interval at 0.5 ms instead of 5 (the GIL's convoy, shortened);
e2e_no_decode_img_s and e2e_no_augment_img_s, with that step's result made once beforehand (the
other parts as in e2e: which part holds the rate back); e2e_cached_img_s and ratio_cached, the e2e
steps once every file is decoded and kept on the device (the decoded-image cache: every epoch after
a run's first); step_beside_decode_img_s and step_beside_augment_img_s, the synthetic steps while a
thread runs that part alone over and over (whether it blocks the steps beyond the GPU time it
takes), and step_beside_python_img_s, beside a thread running only Python (what holding the GIL
alone costs the steps); step_beside_decode_process_img_s and step_beside_augment_process_img_s, the
same beside another process running that part on the same device (what the input in a process of
its own would leave the steps); e2e_input_process_img_s and ratio_input_process, the e2e steps with
data.input_process: the whole input (loader, decode and augmentation threads) in a spawned process
of its own, its batches handed over through CUDA IPC (that fix, measured whole); and where the e2e time goes (ms per batch of each part timed alone:
loader, decode, augment, step; on CUDA, gpu_busy_ms_per_batch: each part's GPU time; with --profile
N, the top ops of N e2e steps). On CUDA, the same with the step replayed from a CUDA graph
(model.cuda_graphs: train/step.py), each against synthetic_graphed_img_s: e2e_graphed_img_s and
ratio_graphed, e2e_thread_per_step_graphed_img_s, e2e_cached_graphed_img_s and ratio_graphed_cached, and
step_beside_python_graphed_img_s (whether the graph takes the steps out of the GIL's convoy); graphed:
whether every capture took. With no --data it writes demo images at --image-size pixels into a
temporary folder. --ahead N prefetches N batches ahead (default: 2 on CUDA, none on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from clfpipe.contract.dataset import scan_split
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.models import build_model, set_trainable, train_mode
from clfpipe.nn.transforms import decode_batch
from clfpipe.train.data import DeviceBatches, augment_decoded
from clfpipe.train.stage import Context, StageData, make_optimizer, param_groups, pick_device
from clfpipe.train.step import WARMUP_STEPS, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps after `warmup` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(it))
    _sync(device)
    return time.perf_counter() - start


def forever(loader):
    while True:
        yield from loader


def plain_torch_step(arch: str, classes: int, device: torch.device):
    """The baseline: torchvision's model, AMP bf16 on CUDA, channels_last, SGD; nothing of clfpipe's."""
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(batch) -> None:
        x, y = batch
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def seconds_each(fn, items, device: torch.device) -> float:
    """Mean seconds of fn over items, each call synchronised."""
    _sync(device)
    start = time.perf_counter()
    for item in items:
        fn(item)
        _sync(device)
    return (time.perf_counter() - start) / len(items)


def gpu_ms_each(fn, items) -> float:
    """Mean milliseconds of GPU work (kernels and copies, from torch.profiler) per call of fn over
    items: what a part takes from the GPU the step also runs on, however long its host side is."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for item in items:
            fn(item)
        torch.cuda.synchronize()
    # the device's own events only: a host op's row also carries its kernels' time (the profiler's table sums the same way)
    device_us = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return round(device_us / 1000 / len(items), 2)


def breakdown(data: StageData, batches: list, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per batch of the e2e step's input parts, each timed alone (the step itself is
    the synthetic figure); on CUDA also the GPU's busy time of decode and augmentation. Where the
    parts' GPU times and the step's add up to the e2e time, the input waits for the GPU, not the host."""
    it = forever(data.host_loader)
    start = time.perf_counter()
    for _ in range(len(batches)):
        next(it)
    loader_s = (time.perf_counter() - start) / len(batches)
    decode = lambda b: data.train_loader.steps[0](b[0])  # noqa: E731 - the stage's own decode step
    prepare = lambda b: data.train_loader.prepare(b[0])  # noqa: E731
    decode_s, prepare_s = seconds_each(decode, batches, device), seconds_each(prepare, batches, device)
    wall = {"loader_ms": round(loader_s * 1000, 2), "decode_ms": round(decode_s * 1000, 2),
            "augment_ms": round((prepare_s - decode_s) * 1000, 2)}
    if device.type != "cuda":
        return wall, {}
    decode_gpu, prepare_gpu = gpu_ms_each(decode, batches), gpu_ms_each(prepare, batches)
    return wall, {"decode_ms": decode_gpu, "augment_ms": round(prepare_gpu - decode_gpu, 2)}


Sample = tuple[list, list, torch.Tensor]  # made_once's


def made_once(data: StageData, n: int, device: torch.device) -> Sample:
    """n loader batches' encoded bytes, the same decoded, and the first one's model input: the
    parts' results that the probes below hand on again and again."""
    decode, augment = data.train_loader.steps
    encoded = [b[0] for _, b in zip(range(n), forever(data.host_loader))]
    decoded = [decode(e) for e in encoded]
    ready = augment(decoded[0])
    _sync(device)  # made on this thread's stream; the prefetch threads' streams read them without waiting on it
    return encoded, decoded, ready


def without_each_part(step, data: StageData, sample: Sample, warmup: int, steps: int, device: torch.device,
                      ahead: int) -> dict[str, float]:
    """Seconds of the e2e steps with one input step replaced by its result on one batch, made
    beforehand and handed on again each time (the rest as in e2e): which part holds the rate back."""
    decode, augment = data.train_loader.steps
    _, decoded, ready = sample
    variants = {"no_decode": (lambda _: decoded[0], augment), "no_augment": (decode, lambda _: ready)}
    return {name: timed_steps(step, forever(DeviceBatches(data.host_loader, parts, device, ahead=ahead)), warmup, steps, device)
            for name, parts in variants.items()}


SHORT_SWITCH_S = 0.0005  # a tenth of the interpreter's default


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """The interpreter's switch interval at `seconds` within: how long a thread that wants the GIL
    back waits before it makes the holder give it up (5 ms by default). Every torch call releases
    the GIL, and a thread that gives it up often can lose every race to take it back and wait out
    the whole interval (the convoy); shorter, the waits are shorter."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def beside_each_part(step, data: StageData, sample: Sample, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Seconds of the synthetic steps while a thread runs one input part over and over on its own
    stream (as the prefetch threads do, but never waiting for the step): a part whose own GPU time
    is small but which slows the steps a lot blocks them some other way (a device-wide
    synchronisation, a lock, the GIL); and beside a thread running only Python, the GIL's share."""
    decode, augment = data.train_loader.steps
    encoded, decoded, x = sample
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    parts = (("decode", decode, encoded), ("augment", augment, decoded), ("python", _python_only, [None]))
    return {name: _with_background(step, (x, y), part, items, warmup, steps, device) for name, part, items in parts}


def _python_only(_: object) -> int:
    """Pure Python, no torch call (a few ms): beside it, what the GIL alone costs the steps."""
    return sum(i * i for i in range(200_000))


def _with_background(step, batch, part, items: list, warmup: int, steps: int, device: torch.device) -> float:
    stop = threading.Event()

    def loop() -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for item in itertools.cycle(items):
                if stop.is_set():
                    return
                part(item)
                if stream is not None:
                    stream.synchronize()  # one batch at a time, as a prefetch thread's queue allows

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        return timed_steps(step, forever([batch]), warmup, steps, device)
    finally:
        stop.set()
        thread.join()


def beside_in_a_process(step, data: StageData, sample: Sample, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Seconds of the synthetic steps while another process runs one input part over and over on
    the same GPU (its own CUDA context: neither the GIL nor a context-wide synchronisation such as
    cudaFree's reaches this one; the GPU time-slices between the two): whether moving the input to
    a process of its own would let the steps run."""
    encoded, _, x = sample
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    payload = (encoded[0].flat, encoded[0].lengths, data.spec, data.policy, str(device))
    return {name: _with_process(step, (x, y), name, payload, warmup, steps, device) for name in ("decode", "augment")}


def _with_process(step, batch, part: str, payload: tuple, warmup: int, steps: int, device: torch.device) -> float:
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    ready, stop = context.Event(), context.Event()
    child = context.Process(target=_part_forever, args=(part, *payload, ready, stop), daemon=True)
    child.start()
    try:
        if not ready.wait(timeout=300):
            raise RuntimeError(f"the {part} process did not start within 300 s (exit code {child.exitcode})")
        return timed_steps(step, forever([batch]), warmup, steps, device)
    finally:
        stop.set()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def _part_forever(part: str, flat: torch.Tensor, lengths: torch.Tensor, spec, policy, device_name: str, ready, stop) -> None:
    """In the child: decode (or augment the decoded) batch on the device until told to stop, a
    batch at a time; `ready` once the first has run."""
    device = torch.device(device_name)
    encoded = list(torch.split(flat, lengths.tolist()))
    images = decode_batch(encoded, device)
    generator = torch.Generator().manual_seed(0)
    run = {"decode": lambda: decode_batch(encoded, device),
           "augment": lambda: augment_decoded(images, spec, policy=policy, generator=generator)}[part]
    run()
    _sync(device)
    ready.set()
    while not stop.is_set():
        run()
        _sync(device)


@contextlib.contextmanager
def stage_with(ctx: Context, model, **data_fields) -> Iterator[StageData]:
    """The first stage's data with the recipe's data section changed by ``data_fields``, closed
    after, with what its context started (an input process)."""
    recipe = replace(ctx.recipe, data=replace(ctx.recipe.data, **data_fields))
    with contextlib.closing(replace(ctx, recipe=recipe)) as changed, \
            contextlib.closing(StageData(model, recipe.stages[0], 0, changed)) as data:
        yield data


def input_in_a_process(step_of, ctx: Context, model, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds of the e2e steps with ``data.input_process``: the stage's whole input (its loader
    workers, and the decode and augmentation threads on their streams, as in e2e) in a spawned
    process of its own, its batches handed over through CUDA IPC (shared memory on the CPU). The
    fix that the step_beside_*_process figures point to, measured whole: the steps share no GIL
    and no host lock with the input."""
    with stage_with(ctx, model, input_process=True) as data:
        return timed_steps(step_of(data), forever(data.train_loader), args.warmup, args.steps, device)


def cached_e2e(step_of, ctx: Context, model, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds of the e2e steps once every file is decoded and kept on the device (``DecodedCache``:
    the epochs after a run's first), after one untimed epoch that fills the cache."""
    with stage_with(ctx, model, decoded_cache_gib=float(args.cache_gib)) as data:
        for _ in data.train_loader:
            pass
        if args.ahead is not None:
            data.train_loader.ahead = args.ahead
        return timed_steps(step_of(data), forever(data.train_loader), args.warmup, args.steps, device)


def graphed_figures(step_of, data: StageData, ctx: Context, model, batch, args: argparse.Namespace,
                    device: torch.device) -> dict[str, float | bool]:
    """Seconds of the steps replayed from a CUDA graph (``model.cuda_graphs``), each probe with a
    graph of its own, let go after it: synthetic, e2e (two prefetch threads, and one), e2e cached,
    and beside a thread running only Python (whether the graph takes the steps out of the GIL's
    convoy); ``graphed``: every capture took."""
    warmup = max(args.warmup, WARMUP_STEPS + 2)  # the capture happens within the untimed steps
    took: list = []  # each probe's step until it has run, then whether it captured (its graph let go)

    def graphed(stage_data: StageData):
        took.append(step_of(stage_data, graphs=True))
        return took[-1]

    def settled(seconds: float) -> float:
        took[-1] = took[-1].graphed
        return seconds

    def timed(batches) -> float:
        return settled(timed_steps(graphed(data), batches, warmup, args.steps, device))

    per_step = DeviceBatches(data.host_loader, data.train_loader.steps, device, ahead=data.train_loader.ahead or 2,
                             thread_per_step=True)
    figures: dict[str, float | bool] = {"synthetic": timed(forever([batch])), "e2e": timed(forever(data.train_loader)),
                                        "e2e_thread_per_step": timed(forever(per_step))}
    if data.tensor_decode:
        longer = argparse.Namespace(**{**vars(args), "warmup": warmup})
        figures["e2e_cached"] = settled(cached_e2e(graphed, ctx, model, longer, device))
        figures["step_beside_python"] = settled(_with_background(graphed(data), batch, _python_only, [None], warmup,
                                                                 args.steps, device))
    figures["graphed"] = all(took)
    return figures


def graphed_json(graphed: dict[str, float | bool], images: int, synthetic_s: float) -> dict[str, float | bool | None]:
    """The graphed figures as img/s, with the e2e ratios against the graphed synthetic steps."""
    if not graphed:
        return {}
    rate = {k: round(images / v, 1) for k, v in graphed.items() if not isinstance(v, bool)}
    synthetic = graphed["synthetic"]
    return {"graphed": graphed["graphed"], "synthetic_graphed_img_s": rate["synthetic"],
            "graphed_vs_eager_synthetic": round(synthetic_s / synthetic, 3),
            **{f"{k}_graphed_img_s": v for k, v in rate.items() if k != "synthetic"},
            "ratio_graphed": round(synthetic / graphed["e2e"], 3),
            "ratio_graphed_thread_per_step": round(synthetic / graphed["e2e_thread_per_step"], 3),
            "ratio_graphed_cached": round(synthetic / graphed["e2e_cached"], 3) if "e2e_cached" in graphed else None}


def profile_top(step, batches, steps: int, device: torch.device, top: int = 10) -> dict[str, list]:
    """The e2e steps under torch.profiler: the ops with the most self time on the host and on the
    GPU (ms per step), every thread's (the prefetch thread's decode and augmentation included)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    it = iter(batches)
    step(next(it))
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(next(it))
        _sync(device)
    table = prof.key_averages()
    # self_device_time_total since torch 2.4 (self_cuda_time_total before it, removed later)
    device_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    rows = lambda key: [[e.key, round(key(e) / 1000 / steps, 2)] for e in sorted(table, key=key, reverse=True)[:top]]  # noqa: E731
    return {"host_ms_per_step": rows(lambda e: e.self_cpu_time_total),
            **({"gpu_ms_per_step": rows(device_time)} if device.type == "cuda" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--image-size", type=int, default=384, help="generated demo images (no --data)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also profile this many e2e steps")
    parser.add_argument("--cache-gib", type=float, default=64.0, help="decoded-image cache of the e2e_cached figure")
    parser.add_argument("--ahead", type=int, default=None, help="batches prefetched ahead (default: 2 on CUDA, 0 on the CPU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or Path(tmp) / "data"
        if args.data is None:
            per_class = max(args.batch * (args.steps + args.warmup) // 3 // 4, 8)  # the loader cycles over ~4 epochs
            write_demo_dataset(data_dir, spec=DemoSpec(train_per_class=per_class, valid_per_class=1, image_size=args.image_size))
        recipe = load_recipe(None, [f"model.arch={args.arch}", f"stages.0.size={args.size}", f"data.batch_size={args.batch}",
                                    f"data.num_workers={args.workers}", "data.decode=tensor", "stages.0.augment=side_on",
                                    "data.decoded_cache_gib=0"])  # every batch decoded: the first epoch's rate
        train, valid = scan_split(data_dir, "train", verify=False), scan_split(data_dir, "valid", verify=False)
        device = pick_device("auto")
        ctx = Context(recipe, train, valid, device, Path(tmp))
        model = build_model(recipe.model, len(train.classes)).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        stage = recipe.stages[0]
        set_trainable(model, "all")
        optimizer = make_optimizer(stage, param_groups(model, stage.lr))
        data = StageData(model, stage, 0, ctx)
        if args.ahead is not None:
            data.train_loader.ahead = args.ahead
        train_mode(model)

        def step_of(stage_data: StageData, graphs: bool = False):
            """The training loop's step (train/step.py); graphed: a new graph each time (one captured
            later takes over the gradient tensors: an older one must not replay after it)."""
            return train_step(stage_data.loss, optimizer, device, cuda_graphs=graphs)

        step = step_of(data)

        e2e_s = timed_steps(step, forever(data.train_loader), args.warmup, args.steps, device)
        with switch_interval(SHORT_SWITCH_S):
            short_switch_s = timed_steps(step, forever(data.train_loader), args.warmup, args.steps, device)
        profiled = profile_top(step, forever(data.train_loader), args.profile, device) if args.profile else {}
        ahead = data.train_loader.ahead
        per_step = DeviceBatches(data.host_loader, data.train_loader.steps, device, ahead=ahead, thread_per_step=True)
        per_step_s = timed_steps(step, forever(per_step), args.warmup, args.steps, device) if per_step.threads > 1 else None
        two_steps = len(data.train_loader.steps) == 2  # decode, then augment: the probes of each part
        sample = made_once(data, 2, device) if two_steps else None
        without = without_each_part(step, data, sample, args.warmup, args.steps, device, ahead) if sample else {}
        cached_s = cached_e2e(step_of, ctx, model, args, device) if data.tensor_decode else None
        data.train_loader.ahead = 0  # the same input, prepared inline
        inline_s = timed_steps(step, forever(data.train_loader), args.warmup, args.steps, device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)  # already on the device, as the baseline's
        x = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
        y = torch.randint(0, len(train.classes), (args.batch,), device=device)
        parts, gpu_parts = (breakdown(data, [b for _, b in zip(range(4), forever(data.host_loader))], device)
                            if data.tensor_decode else ({}, {}))
        synthetic_s = timed_steps(step, forever([(x, y)]), args.warmup, args.steps, device)  # the same loss path
        beside = beside_each_part(step, data, sample, args.warmup, args.steps, device) if sample else {}
        beside_process = beside_in_a_process(step, data, sample, args.warmup, args.steps, device) if sample else {}
        input_process_s = input_in_a_process(step_of, ctx, model, args, device) if data.tensor_decode else None
        if gpu_parts:
            gpu_parts["step_ms"] = gpu_ms_each(step, [(x, y)] * 4)
        graphed = graphed_figures(step_of, data, ctx, model, (x, y), args, device) if device.type == "cuda" else {}
        plain = plain_torch_step(args.arch, len(train.classes), device)
        plain_s = timed_steps(plain, forever([(x, y)]), args.warmup, args.steps, device)
    images = args.batch * args.steps
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "arch": args.arch, "size": args.size,
        "batch": args.batch, "steps": args.steps, "e2e_img_s": round(images / e2e_s, 1),
        "synthetic_img_s": round(images / synthetic_s, 1), "ratio": round(synthetic_s / e2e_s, 3),
        "prefetch_batches": ahead, "prefetch_threads": data.train_loader.threads,
        "e2e_thread_per_step_img_s": round(images / per_step_s, 1) if per_step_s else None,
        "e2e_inline_img_s": round(images / inline_s, 1),
        "e2e_short_switch_img_s": round(images / short_switch_s, 1),
        "e2e_input_process_img_s": round(images / input_process_s, 1) if input_process_s else None,
        "ratio_input_process": round(synthetic_s / input_process_s, 3) if input_process_s else None,
        **{f"e2e_{name}_img_s": round(images / seconds, 1) for name, seconds in without.items()},
        "e2e_cached_img_s": round(images / cached_s, 1) if cached_s else None,
        "ratio_cached": round(synthetic_s / cached_s, 3) if cached_s else None,
        **{f"step_beside_{name}_img_s": round(images / seconds, 1) for name, seconds in beside.items()},
        **{f"step_beside_{name}_process_img_s": round(images / seconds, 1) for name, seconds in beside_process.items()},
        **graphed_json(graphed, images, synthetic_s),
        "plain_torch_img_s": round(images / plain_s, 1), "synthetic_vs_plain": round(plain_s / synthetic_s, 3),
        "ms_per_batch_alone": {**parts, "step_ms": round(synthetic_s / args.steps * 1000, 2)},
        "e2e_ms_per_batch": round(e2e_s / args.steps * 1000, 2),
        **({"gpu_busy_ms_per_batch": gpu_parts} if gpu_parts else {}),
    }))
    if profiled:
        print(json.dumps({"check": "train_profile", **profiled}))


if __name__ == "__main__":
    main()
