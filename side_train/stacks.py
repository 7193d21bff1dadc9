"""A sweep's runs grouped for training: configurations that share a seed and a shape train as the members
of one ReadModel (a `Stack`), each with its own learning rate, and one optimiser step trains them all."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .augment import augment
from .config import RunConfig
from .data import TrainBatch, read_spec
from .read_model import ReadAdamW, ReadModel
from .tasks import TaskInfo


@dataclass
class Run:
    """One configuration's progress and early-stopping state (its weights live in its Stack)."""

    config: RunConfig
    parameters: int  # trainable parameters of this configuration's READ network
    train_loss: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)  # per epoch: the task's metric, or the tasks' mean
    task_validation: dict[str, list[float]] = field(default_factory=dict)
    best: float = -float("inf")
    best_epoch: int = -1
    best_state: dict | None = None  # the best-validation weights, as ReadModel.member_state gives them
    stopped: bool = False
    failed: str | None = None  # why training stopped early on an error (a non-finite loss)
    seconds: float = 0.0  # this run's share of its stack's training and validation time

    KEPT = ("train_loss", "validation", "task_validation", "best", "best_epoch", "best_state", "stopped", "failed",
            "seconds")  # what a resumed run needs back


@dataclass
class Stack:
    """The runs that differ only in learning rate (make_stacks' key), trained as the members of one ReadModel.

    A step never waits on the device: which members train, their losses and a loss that stops being
    finite stay in device tensors (`active`, `loss_sum`, `loss_steps`, `failed`, `failed_loss`), which the
    host reads once per epoch (`epoch_losses`) and resets from the runs' own state (`begin_epoch`)."""

    runs: list[Run]
    model: ReadModel
    optimizer: ReadAdamW
    lrs: torch.Tensor  # [M] peak learning rates
    schedule: object  # step -> factor of the peak learning rate
    step: int = 0

    def __post_init__(self):
        self.begin_epoch()

    @property
    def seed(self) -> int:
        return self.runs[0].config.seed

    def begin_epoch(self) -> None:
        """Device state from the runs': every member not stopped trains; the epoch's sums start at 0."""
        device, members = self.lrs.device, len(self.runs)
        self.everyone = not any(r.stopped for r in self.runs)  # known on the host: the optimizer's fast path
        self.active = torch.tensor([not r.stopped for r in self.runs], device=device)  # bool [M]
        self.loss_sum = torch.zeros(members, dtype=torch.float64, device=device)
        self.loss_steps = torch.zeros(members, dtype=torch.int64, device=device)
        self.failed = torch.zeros(members, dtype=torch.bool, device=device)
        self.failed_loss = torch.zeros(members, device=device)
        self.last_losses = torch.zeros(members, device=device)  # the latest step's losses (studies read them)

    def epoch_losses(self, epoch: int, task_names: str, log) -> list[int]:
        """Close the epoch's training half, reading the device state once: each member's mean training loss
        into its run, and a member whose loss stopped being finite stopped, with why. Returns the members
        that trained this epoch."""
        sums, steps, failed, bad = (t.tolist() for t in (self.loss_sum, self.loss_steps, self.failed, self.failed_loss))
        trained = [m for m in range(len(self.runs)) if steps[m] or failed[m]]
        for m in trained:
            run = self.runs[m]
            if steps[m]:
                run.train_loss.append(sums[m] / steps[m])
            if failed[m] and not run.stopped:
                run.stopped = True
                run.failed = (f"training loss became {bad[m]} in epoch {epoch + 1} (task {task_names}); "
                              "this configuration was stopped: try a lower --lr")
                log(f"{run.config.name}: {run.failed}")
        return trained

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]


def init_model(config: RunConfig, cache, tasks: list[TaskInfo] | TaskInfo, device: torch.device = torch.device("cpu"),
               members: int = 1) -> ReadModel:
    """Freshly initialised READ networks of one configuration's shape, `members` of them, all starting from
    the seed's initialisation (the same alone or in a sweep)."""
    tasks = tasks if isinstance(tasks, list) else [tasks]
    torch.manual_seed(config.seed)
    spec = read_spec(cache, config.width, config.cell, **config.spec_choices())
    model = ReadModel(spec, {t.name: (t.num_labels, t.label_head) for t in tasks}, members)
    with torch.no_grad():
        for t in tasks:
            if t.regression:  # see TaskInfo.label_mean
                model.heads[t.name].bias.fill_(t.label_mean)
    return model.to(device)


def schedule_of(config: RunConfig, steps: int):
    """Linear warm-up over `warmup` of the steps, then linear decay to zero at the last step."""
    warm = max(1, int(config.warmup * steps))
    return lambda step: min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm)))


def make_stacks(configs: list[RunConfig], cache, tasks: list[TaskInfo], steps: int, device: torch.device) -> list[Stack]:
    """Group configurations by seed and shape; each group becomes one Stack."""
    groups: dict[tuple, list[RunConfig]] = {}
    for c in configs:
        groups.setdefault(c.stack_key(), []).append(c)
    stacks = []
    for members in groups.values():
        model = init_model(members[0], cache, tasks, device, len(members))
        runs = [Run(c, model.member_parameters()) for c in members]
        stacks.append(Stack(runs, model, ReadAdamW(model.parameters(), members[0].weight_decay),
                            torch.tensor([c.lr for c in members], device=device), schedule_of(members[0], steps)))
    return stacks


def member_losses(task: TaskInfo, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """outputs [M, B, C] -> each member's mean loss [M]."""
    members, batch = outputs.shape[:2]
    if task.regression:
        return ((outputs.squeeze(-1).float() - labels.float()) ** 2).mean(1) / task.label_var
    flat = nn.functional.cross_entropy(outputs.reshape(members * batch, -1), labels.long().repeat(members),
                                       reduction="none")
    return flat.view(members, batch).mean(1)


def train_step(stack: Stack, task: TaskInfo, batch: TrainBatch) -> None:
    """One optimiser step for every member still training; a member whose loss is not finite stops (its
    run learns why at the epoch's end, Stack.epoch_losses). Nothing here waits on the device."""
    config = stack.runs[0].config  # the augmentation every member of the stack shares
    inputs = augment(batch.inputs, config.cutoff, config.noise)
    losses = member_losses(task, stack.model(inputs, task.name), batch.labels)  # [M]
    detached = losses.detach()
    finite = torch.isfinite(detached)
    newly = stack.active & ~finite
    stack.failed_loss = torch.where(newly & ~stack.failed, detached, stack.failed_loss)
    stack.failed = stack.failed | newly
    stack.active = stack.active & finite
    stack.optimizer.zero_grad()
    torch.where(stack.active, losses, 0).sum().backward()  # members share no parameter: each gets its own gradient
    # The fast path updates every member in place; one that failed in this epoch is stopped, and its
    # weights from here on are never read (validation, checkpoints and resume skip a stopped member).
    stack.optimizer.step(stack.lrs * stack.schedule(stack.step), None if stack.everyone else stack.active)
    stack.step += 1
    stack.loss_sum += torch.where(stack.active, detached.double(), 0)
    stack.loss_steps += stack.active
    stack.last_losses = detached
