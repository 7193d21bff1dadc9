"""Frozen backbones behind one small interface, one class per family. A family's class declares the
`model_types` (config.json's) it serves and is registered with `@register_family`; `FAMILIES` is the only list of
supported model types. A family says:

    tokenize      how a task's rows become input ids (T5's template, the tokenizer's text pairs, or the
                  template and an answer cue for a decoder-only LM)
    forward       what it caches per layer, for a right-padded batch: every layer's hidden states and
                  attention maps (each reduced by the caller's `reduce` as it is made, where the family
                  can: a decoder-only LM's maps are the long ones); T5 also runs its decoder for the
                  single start position
    model_inputs  the keyword arguments its transformers model takes besides the ids and mask
    label_head    the label words' LM-head rows (T5, decoder-only), or None: a fresh linear head
    lora_targets  the attention projections LoRA adapts (the method comparison's baseline)

The readout (which positions a head pools) follows from the cache: T5's decoder start position, an
encoder's mean or first token, a decoder-only model's last real token (`--pooling`).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_store import runtime

from .errors import InputError
from .tasks import TaskSpec


@dataclass
class BackboneOutput:
    encoder_hidden: list[torch.Tensor]  # N + 1 x [B, L, d]; 0 = embeddings
    encoder_attention: list[torch.Tensor]  # N x [B, A, L, L] (layers 1..N); [] without attention
    decoder_hidden: list[torch.Tensor]  # N_dec + 1 x [B, d] at the start position; [] for encoders
    cross_attention: list[torch.Tensor]  # N_dec x [B, A, L]; [] without attention or decoder
    reduced: bool = False  # encoder_attention holds each layer's maps as forward's `reduce` returned them


class Backbone:
    family = ""  # recorded in manifests: t5 | bart | bert (BERT-style encoders) | decoder (decoder-only LMs)
    input_format = ""
    model_types: tuple[str, ...] = ()
    auto_class = "AutoModel"  # the transformers auto class that loads it
    lora_targets: tuple[str, ...] = ()
    causal = False  # its attention maps are lower-triangular (cached as their triangles)

    def __init__(self, name: str, model, tokenizer, device: torch.device, init: str, init_seed: int | None):
        self.name, self.model, self.tokenizer, self.device = name, model, tokenizer, device
        self.init, self.init_seed = init, init_seed
        self.config = model.config
        # Described now: a fast tokenizer's serialised state records the truncation and padding of its
        # last call, so a later description would depend on what was tokenized.
        self._tokenizer_description = self._describe_tokenizer()

    # Sizes under the names most configs use (transformers' attribute_map puts GPT-2's, DistilBERT's, T5's
    # and BART's own names behind them); an encoder–decoder adds its decoder's layer count.
    n_decoder_layers = 0

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    def tokenize(self, task: TaskSpec, rows: list[dict], max_length: int) -> list[list[int]]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, attentions: bool = True,
                reduce=None) -> BackboneOutput:
        """With `reduce` (a callable of one layer's [B, A, L, L] maps), encoder_attention holds what it
        returns for each layer, and `attentions` is implied."""
        raise NotImplementedError

    @staticmethod
    def _output(hidden, maps, reduce, decoder_hidden=(), cross=()) -> BackboneOutput:
        maps = [reduce(m) for m in maps or ()] if reduce else list(maps or ())
        return BackboneOutput(list(hidden), maps, list(decoder_hidden), list(cross), reduced=reduce is not None)

    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments the transformers model takes besides the ids and the mask."""
        return {}

    def label_head(self, task: TaskSpec) -> tuple[list[int], np.ndarray] | None:
        """(label token ids, [C, d] rows mapping the final decoder state to label-word logits) or None."""
        return None

    def _label_rows(self, task: TaskSpec, ids: list[int]) -> torch.Tensor:
        """[C, d] float32: the LM head's rows for the label words' token `ids`, which must differ."""
        if len(set(ids)) != len(ids):
            raise InputError(f"{task.name}: label words {task.label_words} share their first token {ids}")
        return self.model.get_output_embeddings().weight[ids].detach().float()

    def describe(self) -> dict:
        config = {k: v for k, v in self.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        return {
            "name": self.name,
            "family": self.family,
            "model_type": self.config.model_type,
            "revision": getattr(self.config, "_commit_hash", None),
            "config_hash": _sha256(json.dumps(config, sort_keys=True, default=str)),
            "init": self.init,
            "init_seed": self.init_seed,
            "n_layers": self.n_layers,
            "n_decoder_layers": self.n_decoder_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "input_format": self.input_format,
        }

    def describe_tokenizer(self) -> dict:
        return self._tokenizer_description

    def _describe_tokenizer(self) -> dict:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return {"name": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer), "hash": _sha256(text)}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


FAMILIES: dict[str, type[Backbone]] = {}  # model_type -> its family's class


def register_family(cls: type[Backbone]) -> type[Backbone]:
    """Register a family for its model types."""
    for model_type in cls.model_types:
        if model_type in FAMILIES:
            raise ValueError(f"model type {model_type} has two families")
        FAMILIES[model_type] = cls
    return cls


@register_family
class T5Backbone(Backbone):
    family = "t5"
    input_format = "t5-template"
    model_types = ("t5", "mt5")  # Flan-T5 is model type t5
    auto_class = "AutoModelForSeq2SeqLM"
    lora_targets = ("q", "v")

    @property
    def n_decoder_layers(self):  # the other sizes: T5's config maps the common names onto its own
        return self.config.num_decoder_layers

    def tokenize(self, task, rows, max_length):
        texts = [task.format(row) for row in rows]
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def forward(self, input_ids, attention_mask, attentions=True, reduce=None):
        attentions = attentions or reduce is not None
        encoder = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           output_hidden_states=True, output_attentions=attentions)
        start = torch.full((len(input_ids), 1), self.config.decoder_start_token_id, device=input_ids.device)
        decoder = self.model.get_decoder()(input_ids=start, encoder_hidden_states=encoder.last_hidden_state,
                                     encoder_attention_mask=attention_mask, output_hidden_states=True,
                                     output_attentions=attentions, use_cache=False)
        return self._output(encoder.hidden_states, encoder.attentions, reduce,
                            decoder_hidden=[h[:, 0] for h in decoder.hidden_states],
                            cross=[a[:, :, 0] for a in (decoder.cross_attentions or ()) if attentions])

    def label_head(self, task):
        if task.is_regression:
            return None
        ids = [self.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in task.label_words]
        rows = self._label_rows(task, ids)
        # T5 scales the decoder output before a tied LM head (mT5 never does); folding the scale in makes
        # logits = final decoder state @ label_head.T exactly the backbone's label-word logits.
        scale = getattr(self.config, "scale_decoder_outputs",
                        self.config.model_type == "t5" and self.config.tie_word_embeddings)
        if scale:
            rows = rows * self.config.d_model ** -0.5
        return ids, rows.cpu().numpy()


@register_family
class BartBackbone(T5Backbone):
    """BART: an encoder–decoder read as T5 is (the task's template in, the decoder at its start position), its
    sizes under BART's names. Its LM head adds final_logits_bias (zeros in the released checkpoints); a
    label head cannot hold a bias, so a model whose bias is not 0 at the label words is refused."""

    family = "bart"
    model_types = ("bart",)
    lora_targets = ("q_proj", "v_proj")

    @property
    def n_decoder_layers(self):  # the encoder's sizes: BART's config maps the common names onto them
        return self.config.decoder_layers

    def label_head(self, task):
        if task.is_regression:
            return None
        ids = [self.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in task.label_words]
        bias = getattr(self.model, "final_logits_bias", None)
        if bias is not None and bias[0, ids].any():
            raise InputError(f"{self.name}: its LM head's final_logits_bias is not 0 at the label words "
                             f"{list(task.label_words)}; a label-word head has no bias")
        return ids, self._label_rows(task, ids).cpu().numpy()


@register_family
class EncoderBackbone(Backbone):
    """BERT-style encoders (e.g. all-MiniLM-L6-v2): sentence pairs as the tokenizer's text pairs."""

    family = "bert"
    input_format = "text-pair"
    model_types = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "mpnet")
    _LORA = {"distilbert": ("q_lin", "v_lin"), "deberta-v2": ("query_proj", "value_proj"), "mpnet": ("q", "v")}

    @property
    def lora_targets(self):
        return self._LORA.get(self.config.model_type, ("query", "value"))

    def tokenize(self, task, rows, max_length):
        columns = [[row[name] for row in rows] for name in task.fields]
        return self.tokenizer(*columns, truncation=True, max_length=max_length)["input_ids"]

    def model_inputs(self, input_ids, attention_mask) -> dict:
        """Token types where the model has segment embeddings (BERT; not RoBERTa's single type, DistilBERT,
        DeBERTa-v3 or MPNet), rebuilt from the ids: the cache stores no token types."""
        if getattr(self.config, "type_vocab_size", 0) > 1 and "token_type_ids" in self._forward_arguments:
            return {"token_type_ids": token_types(input_ids, attention_mask, self.tokenizer.sep_token_id)}
        return {}

    @functools.cached_property
    def _forward_arguments(self):
        return inspect.signature(self.model.forward).parameters

    def forward(self, input_ids, attention_mask, attentions=True, reduce=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         output_attentions=attentions or reduce is not None,
                         **self.model_inputs(input_ids, attention_mask))
        return self._output(out.hidden_states, out.attentions, reduce)


@register_family
class DecoderOnlyBackbone(Backbone):
    """Decoder-only LMs: a task's row behind T5's template and an answer cue, so that the next token is a
    label word. The one stack is cached under encoder/ (decoder/ paths mean T5's start position); its
    maps are causal, one per query head (grouped-query attention repeats the key heads). READ's heads read
    the last real token (`--pooling auto`), and a classification head starts from the LM head's rows of
    the label words: a fresh READ network predicts what the frozen model does zero-shot. Batches are right
    padded, so a model without a pad token needs none: padding comes after every real token, which
    causal attention never lets a real token see."""

    family = "decoder"
    input_format = "prompt"
    model_types = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")
    auto_class = "AutoModelForCausalLM"
    causal = True
    ANSWER = " answer:"  # after the task's template; the label word comes next

    @property
    def lora_targets(self):
        return ("c_attn",) if self.config.model_type == "gpt2" else ("q_proj", "v_proj")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize(self, task, rows, max_length):
        """The template (truncated so the cue survives), then the answer cue."""
        answer = self._ids(self.ANSWER)
        if max_length <= len(answer):
            raise InputError(f"--max-length {max_length} leaves no room for the input before the answer cue")
        bodies = self.tokenizer([task.format(row) for row in rows], truncation=True,
                                max_length=max_length - len(answer))["input_ids"]
        return [body + answer for body in bodies]

    def forward(self, input_ids, attention_mask, attentions=True, reduce=None):
        """The base model (no logits over the vocabulary). With `reduce`, a hook on each layer's attention
        module reduces its maps as the layer returns them, and the model is not asked to collect them:
        no more than one layer's dense maps exist at a time (a 7B model's 32 layers of [B, 32, L, L]
        would not fit beside it)."""
        if reduce is None:
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                        output_attentions=attentions, use_cache=False)
            return self._output(out.hidden_states, out.attentions, None)
        maps = []
        # Eager attention modules return (output, maps) whether or not the model collects the maps.
        hooks = [module.register_forward_hook(lambda _, __, output: maps.append(reduce(output[1])))
                 for module in self._attention_modules()]
        try:
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        output_hidden_states=True, output_attentions=False, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return BackboneOutput(list(out.hidden_states), maps, [], [], reduced=True)

    def _attention_modules(self) -> list[torch.nn.Module]:
        """Each layer's self-attention module, in order (GPT-2: .h[i].attn; Llama and the rest: .layers[i].self_attn)."""
        base = self.model.base_model
        layers = base.h if hasattr(base, "h") else base.layers
        return [layer.attn if hasattr(layer, "attn") else layer.self_attn for layer in layers]

    def label_head(self, task):
        """Each label word's first token as it follows the answer cue, and the LM head's rows for them (the
        last hidden state is already the final norm's output; no family here rescales it)."""
        if task.is_regression:
            return None
        answer = self._ids(self.ANSWER)
        ids = []
        for word in task.label_words:
            full = self._ids(self.ANSWER + " " + word)
            ids.append(full[len(answer)] if full[:len(answer)] == answer and len(full) > len(answer)
                       else self._ids(" " + word)[0])
        return ids, self._label_rows(task, ids).cpu().numpy()


def token_types(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Segment B starts after the first [SEP]: rebuilt from the ids, so the cache need not store token types."""
    sep = input_ids == sep_id
    return ((sep.cumsum(1) - sep.long()) > 0).long() * attention_mask


INITS = ("pretrained", "random")


GENERIC_FOLDERS = {"model", "models", "checkpoint", "weights", "snapshot", "pretrained", "hf_model"}


def backbone_name(model: str, name: str | None = None) -> str:
    """What a cache folder and manifest call the model: `name` when given; a local folder's name, unless
    it says nothing (model/, as in packaged models): then the title of its model card (README.md), else
    its parent folder's name; a hub id as given. Never config.json's `_name_or_path`: that records the
    model it was trained from (all-MiniLM-L6-v2's says nreimers/MiniLM-L6-H384-uncased)."""
    if name:
        return name.replace("/", "--")
    path = Path(model)
    if not path.exists():
        return model.replace("/", "--")
    folder = path.resolve()
    if folder.name.lower() in GENERIC_FOLDERS:
        return _card_title(folder / "README.md") or folder.parent.name
    return folder.name


def _card_title(card: Path) -> str | None:
    """A model card's `# title` (after its YAML front matter), when it is one word such as a model id."""
    if not card.is_file():
        return None
    lines = card.read_text(errors="replace").splitlines()
    if lines and lines[0].strip() == "---":  # front matter: up to the next ---
        closing = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), len(lines))
        lines = lines[closing + 1:]
    title = next((line[2:].strip() for line in lines if line.startswith("# ")), "")
    return title.replace("/", "--") if re.fullmatch(r"[\w.\-/]+", title) else None


def load_backbone(model: str, init: str = "pretrained", seed: int = 0, device: str = "auto",
                  attentions: bool = True, progress: bool = True, name: str | None = None) -> Backbone:
    import transformers

    if not progress:  # transformers draws its own bars while loading weights
        transformers.utils.logging.disable_progress_bar()

    local = Path(model).exists()
    if local and not (Path(model) / "config.json").is_file():
        raise InputError(f"--model {model}: no config.json there; give a folder saved with save_pretrained")
    try:
        config = transformers.AutoConfig.from_pretrained(model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        where = f"the folder {model}" if local else f"the Hugging Face hub ('{model}')"
        raise InputError(f"could not load the model config and tokenizer from {where} ({type(exc).__name__}); "
                         "offline, pass --model DIR: a folder with config.json and the tokenizer files") from None
    if config.model_type not in FAMILIES:
        raise InputError(f"model type {config.model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    kind = FAMILIES[config.model_type]
    auto = getattr(transformers, kind.auto_class)
    # Eager attention is the only implementation that returns attention maps; otherwise transformers picks
    # (SDPA where the model has it: DeBERTa-v2 and MPNet do not).
    attn = "eager" if attentions else None
    if init == "random":
        torch.manual_seed(seed)
        net = auto.from_config(config, attn_implementation=attn)
    elif init == "pretrained":
        try:
            net = auto.from_pretrained(model, attn_implementation=attn)
        except OSError as exc:
            raise InputError(f"could not load the weights of {model} ({str(exc).splitlines()[0][:160]}); "
                             "pass a --model folder with weights, or --init random for a seeded random "
                             "backbone built from its config") from None
    else:
        raise InputError(f"--init must be one of {INITS}")
    target = runtime.resolve_device(device)
    net = net.to(target).eval().requires_grad_(False)
    return kind(backbone_name(model, name), net, tokenizer, target, init, seed if init == "random" else None)
