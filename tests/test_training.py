"""The seed's training workflow: fixed values stay fixed, and PyTorch trains as Caffe does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from profiles import examples

from crossval.heads import HEADS, Case
from crossval.mutants import TRAINING_MUTANTS
from crossval.reference.solvers import (
    LR_POLICIES,
    SOLVER_TYPES,
    USUAL_BASE_LR,
    USUAL_MOMENTUM,
    SolverConfig,
)
from crossval.strategies import build_batches, build_case
from crossval.training import (
    TrainCase,
    compare_trajectories,
    run_parity,
    torch_optim_trajectory,
    torch_trajectory,
)
from crossval.training.strategies import train_cases
from crossval.worker import CaffeWorker


def steps_of(case: Case, steps: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    shape = dict(batch=case.batch, features=case.features, bins=case.bins, spread=3.0)
    return build_batches(case.head, case.loss, range(1000, 1000 + steps), **shape)


def solver_for(kind: str, policy: str, **kw: float) -> SolverConfig:
    """A solver of `kind` with momentum where Caffe allows it, decay, clipping and `policy`."""
    momentum = USUAL_MOMENTUM.get(kind, 0.0)
    base = USUAL_BASE_LR.get(kind, 0.01)
    args: dict[str, object] = dict(
        type=kind,
        base_lr=base,
        lr_policy=policy,
        momentum=momentum,
        gamma=0.5,
        power=0.75,
        stepsize=3,
        stepvalue=(2, 5),
        max_iter=12,
        weight_decay=0.05,
        clip_gradients=1.0,
    )
    args.update(kw)
    return SolverConfig(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("head", ["sigmoid_scale", "expectation"])
@pytest.mark.parametrize("kind", SOLVER_TYPES)
@pytest.mark.parametrize("regularization", ["L2", "L1"])
def test_fixed_values_stay_bit_identical(
    tmp_path: Path, worker: CaffeWorker, head: str, kind: str, regularization: str
) -> None:
    """Every solver, momentum, L1/L2 decay with decay_mult, clipping and every lr policy: the
    99 and the arange(K) kernel are bit-identical after each step and in every snapshot."""
    case = build_case(head, "euclidean", batch=4, features=8, bins=101, spread=3.0, seed=5)
    for policy in LR_POLICIES:
        tc = TrainCase(
            case,
            steps_of(case, 6),
            solver_for(kind, policy, regularization_type=regularization),
            ip_mults=((1.0, 2.0), (2.0, 0.0)),
        )
        got = run_parity(worker, tc, tmp_path / policy, snapshot=2)
        assert got.caffe_fixed is None, (policy, got.caffe_fixed)
        assert got.torch_fixed is None, (policy, got.torch_fixed)
        snaps = got.snapshots
        assert [s.blob.split()[-1] for s in snaps] == [
            f"snapshot_iter_{i}.caffemodel" for i in (2, 4, 6)
        ]
        assert all(s.passed for s in snaps), [str(s) for s in snaps if not s.passed]
        wf = got.workflow
        assert wf.init_weights.is_file() and wf.solver.read_text().startswith('net: "')
        bad = [str(c) for c in got.comparisons if not c.passed]
        assert not bad, bad[:3]
        assert got.comparable_steps >= 1


# 50 examples in `ci` (each trains in Caffe and in float32 and float64 for several steps);
# solver, lr policy, momentum, decay and clipping are drawn for each.
@settings(max_examples=examples(50))
@given(tc=train_cases())
@example(
    tc=TrainCase(  # Adam with momentum2 0.999: Caffe reads it as float32 (0.999000013)
        build_case(
            "expectation", "smooth_l1", batch=1, features=8, bins=2, spread=0.5, seed=3, sigma=0.5
        ),
        steps_of(build_case("expectation", "smooth_l1", batch=1, features=8, bins=2), 6),
        SolverConfig(
            type="Adam",
            base_lr=0.0187833,
            lr_policy="step",
            stepsize=2,
            momentum=0.95,
            weight_decay=1e-4,
        ),
        ((1.0, 1.0), (2.0, 0.0)),
    )
)
def test_training_trajectories_agree(
    tmp_path_factory: pytest.TempPathFactory, worker: CaffeWorker, tc: TrainCase
) -> None:
    """Params and loss after each step: Caffe, CaffeSolver in float32 and float64."""
    got = run_parity(worker, tc, tmp_path_factory.mktemp("train"))
    bad = [str(c) for c in got.comparisons if not c.passed]
    assert not bad, f"{len(bad)} comparisons failed, first: {bad[0]}" if bad else ""
    assert got.caffe_fixed is None and got.torch_fixed is None
    assert got.comparable_steps >= 1  # the first step is always held to its bound


def test_torch_optim_sgd_momentum_diverges_after_an_lr_change(
    tmp_path: Path, worker: CaffeWorker
) -> None:
    """torch.optim.SGD puts lr outside the momentum buffer, Caffe inside: equal while lr is
    constant, different from the first step after the lr changes."""
    case = build_case(
        "expectation", "euclidean", batch=8, features=16, bins=100, spread=3.0, seed=2
    )
    change = 4
    cfg = SolverConfig(
        type="SGD", base_lr=0.002, lr_policy="step", gamma=0.1, stepsize=change, momentum=0.9
    )
    tc = TrainCase(case, steps_of(case, 8), cfg)
    got = run_parity(worker, tc, tmp_path)
    assert got.comparable_steps == tc.steps
    assert all(c.passed for c in got.comparisons)  # Caffe's rule, reimplemented: agrees
    stock = torch_optim_trajectory(
        tc,
        lambda ps: torch.optim.SGD(ps, lr=cfg.base_lr, momentum=cfg.momentum),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=change, gamma=cfg.gamma),
    )
    cmp = compare_trajectories(tc, got.caffe, stock, got.ref64)
    port = [c for c in cmp if c.check == "train torch~caffe" and "weight" in c.blob]
    before = [c for c in port if int(c.blob.rsplit(" ", 1)[1]) <= change]
    after = [c for c in port if int(c.blob.rsplit(" ", 1)[1]) > change]
    assert all(c.passed for c in before), [str(c) for c in before if not c.passed][:2]
    assert after and not any(c.passed for c in after)
    first = next(c for c in port if not c.passed)
    assert first.blob.endswith(f"after step {change + 1}"), str(first)


def test_fixed_layer_with_lr_mult_1_is_reported(tmp_path: Path, worker: CaffeWorker) -> None:
    """Negative control: the seed's net with `lr_mult: 1` on the fixed layer."""
    for head in ("sigmoid_scale", "expectation"):
        case = build_case(head, "euclidean", batch=4, features=8, bins=10, spread=3.0, seed=1)
        tc = TrainCase(case, steps_of(case, 3), solver_for("SGD", "fixed"))
        got = run_parity(worker, tc, tmp_path / head, fixed_lr_mult=1.0)
        msg = got.caffe_fixed
        assert msg is not None and msg.startswith(
            "fixed parameter moved: Caffe pred_age/0 at step 1, largest change "
        ), msg
        assert got.torch_fixed is None


@pytest.mark.parametrize("name", list(TRAINING_MUTANTS))
def test_port_training_a_constant_is_reported(
    tmp_path: Path, worker: CaffeWorker, name: str
) -> None:
    """Negative control: a port whose fixed kernel or scale is a trainable parameter."""
    mutant = TRAINING_MUTANTS[name]
    case = build_case(mutant.head, mutant.loss, batch=4, features=8, bins=10, spread=3.0, seed=1)
    tc = TrainCase(case, steps_of(case, 3), solver_for("SGD", "fixed", weight_decay=0.0))
    got = run_parity(worker, tc, tmp_path, port=mutant.impl)
    msg = got.torch_fixed
    assert msg is not None and msg.startswith(
        "fixed parameter moved: port pred_age.weight at step 1, largest change "
    ), msg
    assert got.caffe_fixed is None


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta"])
def test_reference_constants_are_untouched_by_torch_optimizers(optimizer: str) -> None:
    """The reference's 99 and arange(K) are buffers: no torch optimizer, weight decay or not,
    can reach them."""
    for head in ("sigmoid_scale", "expectation"):
        case = build_case(head, "euclidean", batch=4, features=8, bins=101, spread=3.0)
        h = HEADS[head]
        tc = TrainCase(case, steps_of(case, 4), SolverConfig())
        module = h.reference(case)
        assert "pred_age.weight" not in dict(module.named_parameters())
        traj = torch_optim_trajectory(
            tc, lambda ps: getattr(torch.optim, optimizer)(ps, lr=0.1, weight_decay=0.5)
        )
        want = h.fixed_value(case)
        assert all(v.tobytes() == want.tobytes() for v in traj.fixed)
        assert not np.array_equal(
            traj.params[-1][h.learnable(case)[0]], case.weights[h.learnable(case)[0]]
        )  # it did train


def test_float64_reference_rounds_hyperparameters_like_caffe() -> None:
    cfg = SolverConfig(type="Adam", momentum=0.9, momentum2=0.999, base_lr=0.1)
    seen = cfg.as_caffe_reads_it()
    assert seen.momentum2 == float(np.float32(0.999)) != 0.999
    assert replace(seen).base_lr == float(np.float32(0.1))
    case = build_case("sigmoid_scale", "euclidean", batch=2, features=4, spread=1.0)
    traj = torch_trajectory(TrainCase(case, steps_of(case, 2), cfg), torch.float64)
    assert len(traj.params) == 2
