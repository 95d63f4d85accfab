"""model.cuda_graphs: the training step replayed from a CUDA graph makes the steps the eager step
makes (on a GPU; skipped here with the reason), and where it cannot run (the CPU) the run says so
and trains eagerly."""

import logging

import pytest
import torch

from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.models import build_model, set_trainable, train_mode
from clfpipe.train.loop import train_run
from clfpipe.train.stage import criterion, make_optimizer, param_groups
from clfpipe.train.step import WARMUP_STEPS, EagerStep, GraphedStep, train_step

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")


def _setup(device: torch.device, trainable: str, optimizer: str = "sgd"):
    """A seeded resnet34 with no dropout (a graph draws its dropout masks from other offsets than
    the eager step), in fp32, and its optimizer."""
    recipe = load_recipe(None, ["model.dropout=[0.0, 0.0]", "model.amp=off", f"stages.0.trainable={trainable}",
                                f"stages.0.optimizer={optimizer}"])
    torch.manual_seed(0)
    model = build_model(recipe.model, 3).to(device)
    set_trainable(model, trainable)
    train_mode(model)
    stage = recipe.stages[0]
    return model, make_optimizer(stage, param_groups(model, stage.lr))


def _batches(device: torch.device, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 64, 64, generator=generator).to(device),
             torch.randint(0, 3, (n,), generator=generator).to(device)) for n in sizes]


def test_the_cpu_gets_the_eager_step_whatever_is_asked():
    model, optimizer = _setup(torch.device("cpu"), "all")
    loss = lambda batch: criterion(model(batch[0]), batch[1])  # noqa: E731
    assert type(train_step(loss, optimizer, torch.device("cpu"), cuda_graphs=True)) is EagerStep
    assert type(train_step(loss, optimizer, torch.device("cpu"), cuda_graphs=False)) is EagerStep


@CUDA
@pytest.mark.parametrize("trainable, optimizer", [("all", "sgd"), ("head", "sgd"), ("all", "adamw")])
def test_the_graphed_step_makes_the_eager_steps_weights(trainable, optimizer):
    """Warm-up steps, the capture, replays, and a short batch between replays (eager, into the
    graph's gradient tensors), then replays again: the same losses and weights as the eager steps."""
    device = torch.device("cuda")
    sizes = [8] * (WARMUP_STEPS + 3) + [5] + [8] * 2
    batches = _batches(device, sizes)
    results = []
    for make in (lambda loss, opt: EagerStep(loss, opt), lambda loss, opt: GraphedStep(loss, opt, device)):
        model, optimizer_ = _setup(device, trainable, optimizer)
        step = make(lambda batch, m=model: criterion(m(batch[0]), batch[1]), optimizer_)
        losses = torch.stack([step(batch) for batch in batches]).tolist()
        results.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, step))
    (eager_losses, eager_state, _), (graph_losses, graph_state, graphed) = results
    assert graphed.graphed, "the step was not captured"
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for name, value in eager_state.items():
        assert torch.allclose(graph_state[name].float(), value.float(), rtol=1e-3, atol=1e-4), name


@pytest.mark.slow
def test_a_cpu_run_asked_for_cuda_graphs_says_it_trains_eagerly(tmp_path, caplog):
    data = tmp_path / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=4, valid_per_class=2, image_size=40))
    recipe = load_recipe(None, ["model.cuda_graphs=true", "data.device=cpu", "data.batch_size=4", "stages.0.epochs=1",
                                "stages.0.size=32", "evaluate.tta=[]", "evaluate.report=false"])
    with caplog.at_level(logging.INFO, logger="clfpipe.train"):
        manifest = train_run(data, tmp_path / "run", recipe)
    assert manifest.stage("train")["epochs"] == 1
    warned = [r.getMessage() for r in caplog.records if "model.cuda_graphs has no effect" in r.getMessage()]
    assert len(warned) == 1 and "cpu" in warned[0]
    assert not any("captured as a CUDA graph" in r.getMessage() for r in caplog.records)
