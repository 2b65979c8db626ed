"""Batched seeds: the k seeds of one evaluation model trained at once as one vectorized model (torch.func).

``ELFTrainer.run(..., batched=True)`` lands here. Each seed's model, front/rear and adapters are built exactly as
``fit(seed)`` builds them (``torch.manual_seed(seed)``, then the model, then the adapters); their parameters and
buffers are stacked along a new leading dimension of size k (:func:`torch.func.stack_module_state`) and one training
step runs all k with :func:`torch.func.vmap` over :func:`torch.func.functional_call` of the trainer's own loss
(``ELFTrainer.loss_terms``, the code ``fit`` runs). What stays per seed, outside vmap:

* the batch order: each seed has its own ``torch.Generator`` seeded with the seed and draws ``torch.randperm`` from it
  once per epoch, as ``fit`` does;
* the augmentation draws: each seed has its own augmentation object (``make_augmentation(..., seed=seed)``: DSA or
  DC's) and samples and applies it with its own generator (``ELFTrainer.batch``, as ``fit`` does); the k augmented
  batches are then stacked to ``(k, B, C, H, W)``.

BatchNorm running statistics are stacked buffers ``(k, C)`` updated in place inside vmap, so they come out per seed.
The optimizer is ``torch.optim.SGD`` itself over the stacked parameters: its update is elementwise, so on a
``(k, ...)`` tensor it is k independent SGD updates; the loss that is differentiated is the sum of the k per-seed
losses, whose gradient with respect to seed i's slice is seed i's own gradient. The lr decay (and the optimizer
reset) follow the protocol as in ``fit``. The k runs therefore equal k sequential runs up to float rounding
(vmapped convolutions sum in another order); over many steps that rounding can grow in deep BatchNorm networks
(ResNet-18) until an accuracy differs by a few test images, as a channels-last run's does.

Random operations inside the model (dropout, drop-path) draw from torch's global RNG, whose per-seed streams vmap
cannot reproduce: such models, and runs with callbacks or a (front, rear) pair, fall back to sequential runs with a
one-line reason (printed to stderr and kept in ``EvalResult.data["batched"]``). So do models whose state vmap would
get wrong without an error: a buffer the forward pass reassigns instead of updating in place
(``self.n = self.n + 1``: only its in-place updates reach the stacked buffers), a tensor attribute that is neither
parameter nor buffer but differs between seeds (only one seed's would be used), and seeds whose models differ in
structure.

With ``features_on_augmented`` the teacher (shared by the seeds, in eval mode) runs outside vmap, once per step on
the k augmented batches flattened to ``(k * B, C, H, W)``; its features, unflattened to ``(k, B, *F)``, are the front
term's per-seed targets.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .adapters import ELFAdapters
from .dc_augment import make_augmentation
from .errors import DivergedError, ELFError
from .losses import FeatureDistance, feature_distance
from .trainer import DivergenceWatch, ELFTrainer, finite_state, newly_nonfinite

if TYPE_CHECKING:
    from .trainer import EvalResult

__all__ = ["run_batched", "batched_unsupported"]

#: What ``EvalResult.data["batched"]["wall_time_s"]`` says about the per-seed wall times of a batched run.
WALL_TIME_NOTE = "each group's wall time (build, train, test), split evenly over its seeds"

Tensors = dict[str, Tensor]
StepFn = Callable[[Tensors, Tensors, Tensor, Tensor, "Tensor | None", "Tensor | None"], tuple[Tensor, ...]]


class _Bundle(nn.Module):
    """One seed's trained modules (model, its front and rear, adapters); ``forward`` is that seed's loss.

    Front and rear share their parameters with the model, so ``named_parameters()`` lists each tensor once (under
    ``model.``, the names :func:`stack_module_state` stacks under); see :func:`_slots` for how they are swapped in.
    """

    def __init__(self, trainer: ELFTrainer, model: nn.Module, front: nn.Module | None, rear: nn.Module | None,
                 adapters: ELFAdapters | None, distance: FeatureDistance) -> None:
        super().__init__()
        self.model = model
        self.front = front
        self.rear = rear
        self.adapters = adapters
        object.__setattr__(self, "_trainer", trainer)  # not a submodule: its tensors are not this seed's state
        object.__setattr__(self, "_distance", distance)

    def forward(self, x: Tensor, y: Tensor, feats: Tensor | None,
                target: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x ``(B, C, H, W)``, y ``(B,)`` or ``(B, K)``, feats and the front target ``(B, *F)`` or None -> loss,
        task, front and rear terms (scalars) and logits ``(B, K)``, exactly as ``fit``'s step computes them."""
        return self._trainer.loss_terms(self.model, self.front, self.rear, self.adapters, x, y, feats,
                                         self._distance, target)


def batched_unsupported(trainer: ELFTrainer) -> str | None:
    """Why ``trainer``'s seeds cannot be batched before anything is built, or None when they may be."""
    if trainer.callbacks:
        return "callbacks observe one model per fit()"
    if isinstance(trainer.model_spec, tuple):
        return "a model given as a (front, rear) pair is not batched"
    return None


def _slots(module: nn.Module) -> dict[str, str]:
    """For each place a parameter or buffer of ``module`` is stored, reached by one of its names, the name it is
    listed under (its first name): ``{"rear.features.5.weight": "model.features.5.weight", ...}``.

    The halves made by :func:`~elf.split_model` hold the model's own submodules, so one module object is reachable by
    several names; :func:`functional_call` swapping it in under each of them would restore it in the wrong order
    (leaving vmap's batched tensors in the model). Each (module object, attribute) pair is named once here.
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    seen: set[tuple[int, str]] = set()
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        owner, _, attr = name.rpartition(".")
        slot = (id(module.get_submodule(owner)), attr)
        first.setdefault(id(t), name)
        if slot not in seen:
            seen.add(slot)
            out[name] = first[id(t)]
    return out


def _vectorized_step(template: _Bundle, with_feats: bool, with_target: bool) -> StepFn:
    """``(params, buffers, x (k, B, C, H, W), y (k, B[, K]), feats (k, B, *F) | None, target (k, B, *F) | None)``
    -> the five outputs of :meth:`_Bundle.forward`, each with a leading k. Random ops inside raise
    (``randomness="error"``)."""
    slots = _slots(template)

    def one_seed(params: Tensors, buffers: Tensors, x: Tensor, y: Tensor, feats: Tensor | None,
                 target: Tensor | None) -> tuple[Tensor, ...]:
        state = {**params, **buffers}
        swapped = {name: state[listed] for name, listed in slots.items()}
        return functional_call(template, swapped, (x, y, feats, target), tie_weights=False)

    in_dims = (0, 0, 0, 0, 0 if with_feats else None, 0 if with_target else None)
    return vmap(one_seed, in_dims=in_dims, randomness="error")  # type: ignore[return-value]


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines)[:200]}"


def _probe(step: StepFn, params: Tensors, buffers: Tensors, x: Tensor, y: Tensor, feats: Tensor | None,
           target: Tensor | None) -> BaseException | None:
    """Run one forward and backward on the first images (scratch copies of the buffers, no update); returns what
    it raised, or None when it works."""
    try:
        scratch = {name: b.clone() for name, b in buffers.items()}
        step(params, scratch, x, y, feats, target)[0].sum().backward()
    except ELFError:  # a mistake in the inputs or the model (not a limit of vmap): the sequential fit would raise it too
        raise
    except Exception as e:  # noqa: BLE001 - any other failure of the probe means: run the seeds one by one
        return e
    finally:
        for p in params.values():
            p.grad = None
    return None


def _reason(error: BaseException) -> str:
    """Why the seeds cannot be batched, in one line, from what the eager probe step raised."""
    if "randomness" in str(error):
        return ("the model draws random numbers in training (e.g. dropout, drop-path, noise) from torch's global RNG, "
                "whose per-seed streams vmap cannot reproduce")
    if ".item()" in str(error):
        return ("the model reads a tensor's value on the host in training (.item(), float(), a Python branch on a "
                "tensor; e.g. BatchNorm with momentum=None), which vmap cannot batch")
    return f"vmap cannot run a training step of this model ({_one_line(error)})"


def _stack(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.stack(parts)  # type: ignore[arg-type]


def _front_targets(teacher_front: nn.Module | None, x: Tensor) -> Tensor | None:
    """The front term's targets ``(k, B, *F)`` for the k augmented batches ``x`` ``(k, B, C, H, W)``: one teacher
    forward on them all (``features_on_augmented``); None without a teacher in the step."""
    target = ELFTrainer.front_target(teacher_front, x.flatten(0, 1))
    return None if target is None else target.unflatten(0, x.shape[:2])


def _prepare(trainer: ELFTrainer, template: _Bundle, params: Tensors, buffers: Tensors, teacher_front: nn.Module | None,
             compile: bool) -> tuple[StepFn, dict[str, Any], str | None]:
    """The vectorized step for ``template``'s structure (compiled when asked and possible), what to record about
    it, and why the seeds must run one by one instead (None when the probe step works)."""
    p = trainer.protocol
    step = _vectorized_step(template, trainer.feature_bank is not None and p.uses_features, teacher_front is not None)
    k = next(iter(params.values())).shape[0]
    first = torch.arange(min(p.batch_size, trainer.images.shape[0]), device=trainer.device)
    x, y, feats = trainer.batch(first, None, None)  # type: ignore[arg-type]
    # stacked like the training batches (contiguous): an expanded view's zero strides made torch.compile compile the
    # step a second time at the first real batch
    xs = x.expand(k, *x.shape).contiguous()
    probe = (xs, y.expand(k, *y.shape).contiguous(), None if feats is None else feats.expand(k, *feats.shape).contiguous(),
             _front_targets(teacher_front, xs))
    info: dict[str, Any] = {"compile": False}
    if compile:
        # every run compiles the same code (vmap's wrapper) for other modules: without a reset, torch.compile
        # would stop compiling it, silently, after a few runs in one process (dynamo's recompile limit)
        torch.compiler.reset()
        compiled: StepFn = torch.compile(step)  # type: ignore[assignment]
        failed = _probe(compiled, params, buffers, *probe)
        if failed is None:
            return compiled, {"compile": True}, None
        info["compile"] = f"failed, ran eagerly ({_one_line(failed)})"
        print(f"{trainer.model_name}: torch.compile of the batched step {info['compile']}", file=sys.stderr)
    error = _probe(step, params, buffers, *probe)
    if error is not None:
        return step, info, _reason(error)
    return step, info, _reassigned_buffer(trainer, template, x, y, feats, teacher_front)


def _reassigned_buffer(trainer: ELFTrainer, template: _Bundle, x: Tensor, y: Tensor, feats: Tensor | None,
                       teacher_front: nn.Module | None) -> str | None:
    """Why the seeds must run one by one when one eager training step of ``template`` (on one batch ``x``
    ``(B, C, H, W)``, no gradient, its state restored afterwards) replaces a buffer with a new tensor: under
    :func:`functional_call` the new tensor would be dropped after every step, silently. None when none is."""
    kept = [(name, module, attr, buf, buf.clone()) for name, module in template.named_modules()
            for attr, buf in module._buffers.items() if buf is not None]
    replaced = []
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        template.train()
        template(x, y, feats, ELFTrainer.front_target(teacher_front, x))
        for name, module, attr, buf, value in kept:
            if module._buffers.get(attr) is not buf:
                replaced.append(f"{name}.{attr}".lstrip("."))
                module._buffers[attr] = buf
            buf.copy_(value)
    if not replaced:
        return None
    return (f"the forward pass reassigns buffer {replaced[0]} (a new tensor, e.g. self.n = self.n + 1) instead of "
            "updating it in place (self.n += 1, copy_()), which vmap's stacked buffers would not keep")


def _plain_tensors(bundle: _Bundle) -> dict[str, Tensor]:
    """The tensors a bundle's modules hold as plain attributes (neither parameters nor buffers), by name."""
    return {f"{name}.{attr}".lstrip("."): value for name, module in bundle.named_modules()
            for attr, value in vars(module).items() if isinstance(value, Tensor)}


def _differs(template: _Bundle, bundles: list[_Bundle]) -> str | None:
    """Why ``bundles`` cannot run as ``template`` with their parameters and buffers swapped in: a plain tensor
    attribute with another value (only ``template``'s would be used), or another structure. None when they can."""
    mine = _plain_tensors(template)
    shapes = {name: t.shape for name, t in [*template.named_parameters(), *template.named_buffers()]}
    for bundle in bundles:
        other = {name: t.shape for name, t in [*bundle.named_parameters(), *bundle.named_buffers()]}
        if other != shapes:
            return "the seeds' models differ in structure (their parameters or buffers differ in names or shapes)"
        theirs = _plain_tensors(bundle)
        for name, t in mine.items():
            u = theirs.get(name)
            if u is None or u.shape != t.shape or not torch.equal(u, t):
                return (f"{name} is a tensor attribute (not a parameter or buffer) that differs between seeds; "
                        "register it as a buffer (register_buffer) to batch the seeds")
    return None


def run_batched(trainer: ELFTrainer, test_images: Tensor, test_labels: Tensor, result: EvalResult, *,
                compile: bool = False, group: int | None = None,
                also_evaluate: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> bool:
    """Train and test ``result.seeds`` as vectorized models of ``group`` seeds each (default: all at once) and fill
    ``result``; False (after printing the reason to stderr and recording it in ``result.data["batched"]``) when
    they must run one by one instead.

    ``compile`` wraps the vectorized step in :func:`torch.compile` after ``torch.compiler.reset()`` (which also
    drops other compiled code of the process); compilation happens in the probe step, and if it fails the step runs
    eagerly and ``data["batched"]["compile"]`` says why. The step is built once and serves every group (the first
    group's first model is the structure the others' weights are swapped into), so groups after the first do not
    compile again, except once for a smaller last group.
    """
    seeds = list(result.seeds)
    size = len(seeds) if group is None else group
    why = batched_unsupported(trainer)
    if why is not None:
        return _fall_back(trainer, result, why)
    distance = feature_distance(trainer.protocol.distance)
    teacher_front = trainer.teacher_front()
    step: StepFn | None = None
    template: _Bundle | None = None
    info: dict[str, Any] = {}
    total = 0.0
    if size < len(seeds):  # the later groups' seeds, one model at a time, before any group trains: found after the
        first = _Bundle(trainer, *trainer._init_model(seeds[0]), distance)  # first group, it would be wasted work
        for seed in seeds[size:]:
            why = _differs(first, [_Bundle(trainer, *trainer._init_model(seed), distance)])
            if why is not None:
                return _fall_back(trainer, result, why)
        del first
    for chunk in [seeds[i : i + size] for i in range(0, len(seeds), size)]:
        t0 = time.perf_counter()
        bundles = [_Bundle(trainer, *trainer._init_model(seed), distance) for seed in chunk]
        why = _differs(template or bundles[0], bundles)
        if why is not None:  # (the first group: later ones were checked above)
            return _fall_back(trainer, result, why)
        params, buffers = stack_module_state(bundles)  # type: ignore[arg-type]
        if step is None:
            template = bundles[0]
            step, info, why = _prepare(trainer, template, params, buffers, teacher_front, compile)
            if why is not None:
                return _fall_back(trainer, result, why)
        assert template is not None
        histories = _train(trainer, template, bundles, params, buffers, step, teacher_front, chunk)
        for bundle in bundles:
            trainer.model, trainer.front, trainer.rear, trainer.adapters = (bundle.model, bundle.front, bundle.rear,
                                                                             bundle.adapters)
            result.accuracies.append(trainer.evaluate(test_images, test_labels))
            result.evaluate_also(trainer, also_evaluate)
        seconds = time.perf_counter() - t0
        total += seconds
        result.histories.extend(histories)
        result.wall_time_s.extend([seconds / len(chunk)] * len(chunk))
        trainer.history = histories[-1]
    trainer._loop = None  # the stacked optimizer is no one seed's: save_state() needs a fit()
    result.data["batched"] = {"seeds": len(seeds), "group": size, **info, "total_s": total,
                              "wall_time_s": WALL_TIME_NOTE}
    return True


def _fall_back(trainer: ELFTrainer, result: EvalResult, why: str) -> bool:
    print(f"{trainer.model_name}: batched seeds fall back to sequential runs: {why}", file=sys.stderr)
    result.data["batched"] = {"fallback": why}
    return False


def _finite_state(params: Tensors, buffers: Tensors, k: int) -> dict[str, Tensor]:
    """:func:`~elf.trainer.finite_state` of the stacked weights, named as the model names them (no ``model.``)."""
    def unprefixed(tensors: Tensors) -> Tensors:
        return {n.removeprefix("model."): t for n, t in tensors.items()}

    return finite_state(unprefixed(params), unprefixed(buffers), k)


def _train(trainer: ELFTrainer, template: _Bundle, bundles: list[_Bundle], params: Tensors, buffers: Tensors,
           step: StepFn, teacher_front: nn.Module | None, seeds: list[int]) -> list[list[dict[str, float]]]:
    """The epoch loop of ``fit`` for k stacked seeds (``step`` swaps them into ``template``); writes the trained
    weights back into ``bundles`` and returns the k logged histories (same epochs and keys as ``fit``'s; ``time_s``
    is the batched loop's)."""
    p, device = trainer.protocol, trainer.device
    k, n, bs = len(seeds), trainer.images.shape[0], p.batch_size
    gens = [torch.Generator(device=device) for _ in seeds]
    for gen, seed in zip(gens, seeds):
        gen.manual_seed(seed)
    dsas = [make_augmentation(p.augment, p.dsa_mode, seed) for seed in seeds]

    def sgd(lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(list(params.values()), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)

    lr = p.lr
    opt = sgd(lr)
    total = p.total_epochs
    log_every = trainer.log_every or max(1, total // 20)
    histories: list[list[dict[str, float]]] = [[] for _ in seeds]
    epochs: Any = range(total)
    bar = None
    if trainer.progress:
        from tqdm.auto import tqdm

        bar = epochs = tqdm(epochs, desc=f"{trainer.model_name} seeds {seeds[0]}..{seeds[-1]} (batched)", unit="ep",
                            leave=False)
    watch = DivergenceWatch((k,), n, device)  # as in fit: read at the logged epochs only
    finite_before = _finite_state(params, buffers, k)  # read once, after training (as fit does)
    start_time = time.perf_counter()
    for epoch in epochs:
        template.train()
        sums = torch.zeros(k, 5, device=device)  # per seed: loss, task, front, rear, correct
        perms = [torch.randperm(n, generator=gen, device=device) for gen in gens]
        for start in range(0, n, bs):
            idx = torch.stack([perm[start : start + bs] for perm in perms])  # (k, B)
            batch = [trainer.batch(i, dsa, gen) for i, dsa, gen in zip(idx, dsas, gens)]
            x, y, feats = (_stack([b[j] for b in batch]) for j in range(3))
            target = _front_targets(teacher_front, x)  # type: ignore[arg-type]
            loss, task, front, rear, out = step(params, buffers, x, y, feats, target)  # type: ignore[arg-type]
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            correct = (out.detach().argmax(-1) == trainer.hard_labels[idx]).sum(1).float()
            m = idx.shape[1]
            terms = [t.detach().expand(k) * m for t in (loss, task, front, rear)]
            sums += torch.stack([*terms, correct], dim=1)
        epoch_lr = lr
        lr, opt = p.after_epoch(epoch, lr, opt, sgd)
        watch.update(epoch, sums[:, 0])
        if epoch % log_every == 0 or epoch == total - 1:
            found = watch.first()
            if found is not None:
                if bar is not None:
                    bar.close()
                raise DivergedError(f"diverged: loss is {found[2]} at epoch {found[1] + 1} of {trainer.model_name} "
                                    f"seed {seeds[found[0]]} (batched with seeds {seeds}); lower lr or lambda")
            elapsed = time.perf_counter() - start_time
            means = (sums / n).tolist()
            for history, row in zip(histories, means):
                history.append({"epoch": float(epoch), "loss": row[0], "task": row[1], "front": row[2], "rear": row[3],
                                 "train_acc": row[4] * 100, "lr": float(epoch_lr), "time_s": elapsed})
            if bar is not None:
                bar.set_postfix(task_loss=f"{means[-1][1]:.3g}", train_acc=f"{means[-1][4] * 100:.1f}%")
    if bar is not None:
        bar.close()
    # the loss watch sees losses before each step: a last step that blows up shows only in the weights
    bad = newly_nonfinite(finite_before, _finite_state(params, buffers, k))
    if bad is not None:
        raise DivergedError(f"diverged: {bad[1]} of {trainer.model_name} seed {seeds[bad[0]]} is NaN or inf after "
                            f"the last step (batched with seeds {seeds}; the losses before it were finite); lower "
                            "lr or lambda")
    with torch.no_grad():
        for i, bundle in enumerate(bundles):
            for name, t in [*bundle.named_parameters(), *bundle.named_buffers()]:
                t.copy_((params[name] if name in params else buffers[name])[i])
    return histories
