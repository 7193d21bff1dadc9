"""The methods READ is compared with, trained on exactly a READ cache's rows: the token ids, labels and
splits are read from the cache, batched in the same length-bucketed order READ uses.

- full fine-tuning, BitFit (only the bias terms), and LoRA and prompt tuning through Hugging Face PEFT:
  each trains a `Classifier`, the backbone plus the head READ's heads use (T5: the decoder's state at
  its start position, the head initialised from the label words' LM-head rows; encoder-only: pooled
  final states and a fresh linear head);
- a linear probe (scikit-learn) on the frozen backbone's pooled final states, read from the cache.

Also the meters every method is measured with: peak memory and energy.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from cache_store import CacheReader, hidden_path
from cache_store.format import pool
from pipeline.backbones import Backbone, load_backbone
from side_train.config import RunConfig
from side_train.data import BatchOrder
from side_train.devices import precision_scope, resolve_precision
from side_train.metrics import score
from side_train.read_model import build_head
from side_train.tasks import TaskInfo, loss_of, predictions_of
from side_train.stacks import schedule_of

BACKPROP_METHODS = ("full", "bitfit", "lora", "prompt")


class TokenSplit(BatchOrder):
    """A cache split's token ids and labels, served as padded batches in READ's batch order."""

    def __init__(self, cache: CacheReader, name: str, pad_id: int):
        reader = cache.split(name)
        self.name, self.pad_id = name, pad_id
        self.ids = [torch.from_numpy(reader.input_ids[a:b].astype(np.int64))
                    for a, b in zip(reader.offsets[:-1], reader.offsets[1:])]
        self.labels = torch.from_numpy(reader.labels.copy())
        self.n_examples = reader.n_examples

    def batch(self, index: torch.Tensor):
        """(ids [B, L], mask [B, L], labels [B]): right-padded to this batch's longest."""
        rows = [self.ids[i] for i in index.tolist()]
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        return ids, mask, self.labels[index]


class Classifier(nn.Module):
    """A backbone and one head, reading what READ's heads read (see the module docstring)."""

    def __init__(self, backbone: Backbone, net: nn.Module, num_labels: int, label_head: torch.Tensor | None,
                 pooling: str = "mean", prompt_tokens: int = 0):
        super().__init__()
        self.net, self.pooling, self.prompt_tokens = net, pooling, prompt_tokens
        self.backbone, self.family, self.config = backbone, backbone.family, backbone.config
        self.pad_id = backbone.tokenizer.pad_token_id or 0
        self.head = build_head(backbone.d_model, num_labels, label_head)  # T5: starts as the backbone's LM head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.backbone.n_decoder_layers:  # encoder–decoder (T5, BART): the decoder's start position
            start = torch.full((len(ids), 1), self.config.decoder_start_token_id, device=ids.device)
            out = self.net(input_ids=ids, attention_mask=mask, decoder_input_ids=start, output_hidden_states=True)
            return self.head(out.decoder_hidden_states[-1][:, 0])  # the final (layer-normed) decoder state
        # The family's own inputs (token types, rebuilt from [SEP]), but PEFT's prompt tuning drops token types.
        kwargs = {} if self.prompt_tokens else self.backbone.model_inputs(ids, mask)
        hidden = self.net(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
        hidden = hidden[:, self.prompt_tokens:]  # the virtual prompt tokens come first
        return self.head(pool(hidden, mask, self.pooling))


def _peft_wrap(method: str, backbone: Backbone, net: nn.Module, options: dict) -> nn.Module:
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model  # the `compare` extra

    task_type = TaskType.SEQ_2_SEQ_LM if backbone.n_decoder_layers else TaskType.FEATURE_EXTRACTION
    if method == "lora":
        targets = list(backbone.lora_targets)
        config = LoraConfig(task_type=task_type, r=options.get("rank", 8), lora_alpha=2 * options.get("rank", 8),
                            lora_dropout=0.1, target_modules=targets)
    else:
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=options.get("prompt_tokens", 20))
    return get_peft_model(net, config)


def build_classifier(method: str, model: str, cache: CacheReader, device: str, options: dict) -> Classifier:
    """The backbone the cache was made from (same init), made trainable as `method` says."""
    backbone_info = cache.manifest["backbone"]
    if backbone_info["family"] == "decoder":
        raise SystemExit(f"{method}: the fine-tuning baselines are not built for decoder-only backbones; "
                         "compare READ with the probe (--methods read,probe)")
    backbone = load_backbone(model, backbone_info["init"], backbone_info["init_seed"] or 0, device,
                             attentions=False, progress=False)
    net = backbone.model.train()
    words = cache.manifest["task"]["label_words"]
    label_head = cache.label_head() if words else None
    if method == "full":
        net.requires_grad_(True)
    elif method == "bitfit":  # T5 has no additive biases: there it trains the relative-position bias tables
        for name, p in net.named_parameters():
            p.requires_grad_("bias" in name)
    elif method in ("lora", "prompt"):
        net = _peft_wrap(method, backbone, net, options)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(BACKPROP_METHODS)}")
    prompt = options.get("prompt_tokens", 20) if method == "prompt" else 0
    return Classifier(backbone, net, len(words) or 1, label_head, options.get("pooling", "mean"),
                      prompt).to(backbone.device)


def counts(classifier: Classifier) -> tuple[int, int]:
    """(trainable parameters, the frozen backbone's parameters)."""
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    base = getattr(classifier.net, "get_base_model", lambda: classifier.net)()
    backbone = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    return trainable, backbone


@torch.no_grad()
def _evaluate(classifier: Classifier, split: TokenSplit, task: TaskInfo, batch_size: int,
              device: torch.device) -> float:
    classifier.eval()
    outputs = []
    for ids, mask, _ in split.batches(batch_size, shuffle=False):
        outputs.append(classifier(ids.to(device), mask.to(device)).float().cpu())
    classifier.train()
    return score(task.metric, split.labels.numpy(), predictions_of(task, torch.cat(outputs)).numpy())


def train_backprop(method: str, model: str, cache: CacheReader, lr: float, seed: int, epochs: int, batch_size: int,
                   device: str, options: dict, progress=None, precision: str = "auto") -> dict:
    """Train one configuration; every epoch is validated and tested, and the test metric reported is the
    one at the best validation epoch (as READ's best-validation checkpoint is tested). `precision` as
    train-side's (TF32 on a GPU by default), so that neither side is timed at a precision the other is not."""
    torch.manual_seed(seed)
    classifier = build_classifier(method, model, cache, device, options)
    target = next(classifier.parameters()).device
    with precision_scope(resolve_precision(precision, target), target):
        return _train(classifier, target, cache, lr, seed, epochs, batch_size, options, progress)


def _train(classifier, target, cache, lr, seed, epochs, batch_size, options, progress) -> dict:
    task = TaskInfo.from_cache(cache)
    splits = {name: TokenSplit(cache, name, classifier.pad_id) for name in ("train", "validation", "test")}
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=options.get("weight_decay", 0.01))
    steps = epochs * splits["train"].n_batches(batch_size)
    # train-side's schedule at its default warm-up (6% of the steps), then linear decay
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(RunConfig(), steps))
    curve, tests, losses, epoch_seconds = [], [], [], []
    for epoch in range(epochs):
        began, total, count = time.perf_counter(), torch.zeros((), dtype=torch.float64, device=target), 0
        for ids, mask, labels in splits["train"].batches(batch_size, shuffle=True, seed=seed * 100_003 + epoch):
            loss = loss_of(task, classifier(ids.to(target), mask.to(target)), labels.to(target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach().double()  # read once per epoch: the step never waits on the device
            count += 1
            if progress:
                progress()
        curve.append(_evaluate(classifier, splits["validation"], task, 2 * batch_size, target))
        epoch_seconds.append(time.perf_counter() - began)  # training and validation, as READ's epochs count
        tests.append(_evaluate(classifier, splits["test"], task, 2 * batch_size, target))
        losses.append(float(total) / max(count, 1))
    best = int(np.argmax(curve))
    trainable, backbone = counts(classifier)
    return {"validation": curve[best], "test": tests[best], "best_epoch": best, "validation_curve": curve,
            "train_loss": losses, "epochs": epochs, "epoch_seconds": epoch_seconds, "trainable": trainable,
            "backbone_parameters": backbone}


def pooled_features(cache: CacheReader, split: str, pooling: str = "mean") -> np.ndarray:
    """The frozen backbone's final state per example, from the cache: T5's decoder state at its start
    position, or an encoder's final token states pooled as READ pools them."""
    reader = cache.split(split)
    backbone = cache.manifest["backbone"]
    if backbone["n_decoder_layers"]:
        return reader.load(hidden_path("decoder", backbone["n_decoder_layers"])).float().numpy()
    tokens = reader.load(hidden_path("encoder", backbone["n_layers"])).float()  # [T, d]
    pieces = torch.split(tokens, np.diff(reader.offsets).tolist())
    return torch.stack([p[0] if pooling == "first" else p.mean(0) for p in pieces]).numpy()


def train_probe(cache: CacheReader, c: float, seed: int) -> dict:
    """Logistic regression (ridge regression for STS-B) on standardised frozen features; `c` is the inverse
    regularisation strength (ridge's alpha is 1/c)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    task = cache.manifest["task"]
    features = {name: pooled_features(cache, name) for name in ("train", "validation", "test")}
    labels = {name: cache.split(name).labels for name in features}
    began = time.perf_counter()
    estimator = Ridge(alpha=1 / c) if not task["label_words"] else LogisticRegression(
        C=c, max_iter=2000, random_state=seed)
    probe = make_pipeline(StandardScaler(), estimator).fit(features["train"], labels["train"])
    seconds = time.perf_counter() - began
    result = {name: score(task["metric"], labels[name], probe.predict(features[name]))
              for name in ("validation", "test")}
    d = features["train"].shape[1]
    return {**result, "best_epoch": 0, "validation_curve": [result["validation"]], "train_loss": [], "epochs": 1,
            "epoch_seconds": [seconds], "trainable": d * (len(task["label_words"]) or 1) + (len(task["label_words"]) or 1)}
