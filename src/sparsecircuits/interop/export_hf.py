"""Export a model as a transformers directory (``sparsecircuits export-hf``).

The directory holds ``config.json`` (``model_type`` ``sparsecircuits_gpt``, every GPTConfig
field at the top level, ``auto_map`` to the shipped code), ``model.safetensors`` (our
state-dict names, float32; a tied unembedding is stored once, as ``transformer.wte.weight``),
the two code files of ``hf_template/`` (they import only torch and transformers) and the
tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, a ``PreTrainedTokenizerFast`` with
eos = pad = ``<|endoftext|>``). ``AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(OUT)`` load it offline.

``hf_template/modeling_sparsecircuits.py`` is a second copy of the forward pass, so every export
is checked against the package (:func:`verify_export`): the written directory is loaded with
transformers in-process and compared to ours on random full-context sequences (logits), greedy
generation with the cache, a left-padded batch, and the tokenizer's ids; on a mismatch nothing
is left at OUT. AbsTopK makes the logits discontinuous: where the k-th and (k+1)-th largest |x|
are closer than float32 rounding, two implementations keep different entries and that position
moves by O(0.1). So the logits, generation and padding are compared with the export keeping our
selections, and the export's own selections must equal ours up to such near-ties
(``hf_parity``).

AbsTopK ties: our kernels keep the lowest index among entries tied in |x| at the threshold; the
exported code uses ``torch.topk`` + scatter, whose choice among exact ties is unspecified. The
kept values agree except for +a/-a ties (zeros tied at the threshold give identical outputs).

Known transformers behaviour: ``AutoTokenizer.from_pretrained(OUT)`` loads the config first,
and because ``config.json`` maps AutoConfig to the shipped code it asks (interactive sessions
only, 15 s timeout) whether to run it; answering no, or passing ``trust_remote_code=True``,
both give the same ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparsecircuits.data import EOT, Tokenizer
from sparsecircuits.errors import CheckpointError, InputError, SparseCircuitsError
from sparsecircuits.fileio import atomic_dir
from sparsecircuits.interop.hf_parity import (
    ATOL,
    RTOL,
    Diff,
    TieStats,
    compare_generate,
    compare_logits,
    compare_padded,
)
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import load_model, resolve_model_dir

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().with_name("hf_template")
TEMPLATE_FILES = ("configuration_sparsecircuits.py", "modeling_sparsecircuits.py")
MODEL_TYPE = "sparsecircuits_gpt"
ARCHITECTURE = "SparseCircuitsForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_sparsecircuits.SparseCircuitsConfig",
    "AutoModel": "modeling_sparsecircuits.SparseCircuitsModel",
    "AutoModelForCausalLM": f"modeling_sparsecircuits.{ARCHITECTURE}",
}
# An AbsTopK choice may differ from ours only between entries this close (relative) to the
# threshold: float32 rounding through a few blocks is ~1e-6 relative, a wrong rule far more.
TIE_RTOL = 1e-4
# Texts whose ids the exported tokenizer must reproduce: code, unicode, a literal EOT (ordinary
# bytes for us, so the export sets split_special_tokens), whitespace runs.
CHECK_TEXTS = (
    'def f(x):\n    return {"a": [1, 2.5e-3]}  # done\n\n',
    "class Ünïcödé:\n\tpass  # 日本語 ✓\r\n",
    f"s = '{EOT}'\n",
    "   \n\n  x=1;y  =  2\n",
)


@dataclass(frozen=True)
class ParityReport:
    """How the exported model compares to ours (see :func:`verify_export` and ``hf_parity``).
    ``forced``: the export keeping our AbsTopK selections; ``free``: each model on its own."""

    logits: Diff  # forced, over the checked sequences
    free_logits: Diff  # free (near-tie flips included)
    topk: TieStats  # the export's own AbsTopK choices vs ours, wherever it was forced
    generate_equal: bool  # forced greedy generation (with the cache) gives our tokens
    free_generate_equal: bool
    padded: Diff  # forced: left-padded batch vs our logits of each row alone
    free_padded: Diff  # free: left-padded batch vs the export on each row alone
    tokenizer_equal: bool  # AutoTokenizer ids equal ours on CHECK_TEXTS


def export_hf(
    model: str | Path | GPT,
    out: str | Path,
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    check: bool = True,
    tie_rtol: float = TIE_RTOL,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a transformers directory at ``out``; returns ``out``.

    ``model``: a GPT, or anything ``load_model`` accepts (a directory, a run, a shipped name).
    ``tokenizer``: a Tokenizer or its file/directory; default: the model directory's. With
    ``check`` the directory is loaded with transformers and compared to ``model``
    (:func:`verify_export`: logits to ``ATOL + RTOL * max|logit|`` given our AbsTopK selections,
    the selections themselves up to near-ties within ``tie_rtol``); on a mismatch a one-line
    CheckpointError is raised and nothing is left at ``out``. An existing ``out`` is replaced
    only with ``overwrite``.
    """
    try:
        import transformers  # noqa: F401 (needed for the check and the config's version)
    except ImportError:
        raise SparseCircuitsError(
            "export-hf needs transformers: pip install transformers"
        ) from None
    gpt, tok = _resolve(model, tokenizer)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass overwrite (--force) to replace it")
    with atomic_dir(out) as tmp:
        write_hf_dir(gpt, tok, tmp)
        if check:
            try:
                report = verify_export(gpt, tok, tmp)
            except SparseCircuitsError:
                raise
            except Exception as err:  # transformers or the template failed to load or run
                raise CheckpointError(
                    f"export to {out} refused: transformers could not load or run it "
                    f"({type(err).__name__}: {err}); nothing was written"
                ) from None
            finally:
                _forget_dynamic_module(tmp)
            failed = failures(report, tie_rtol=tie_rtol)
            if failed:
                raise CheckpointError(
                    f"export to {out} refused: the transformers model does not match "
                    f"sparsecircuits ({'; '.join(failed)}); nothing was written"
                )
            log.info("export parity: %s", report)
    return out


def write_hf_dir(model: GPT, tokenizer: Tokenizer, directory: str | Path) -> None:
    """Write config, weights, code and tokenizer files into ``directory`` (no checks)."""
    import transformers

    directory = Path(directory)
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise InputError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model only {cfg.vocab_size}"
        )
    eot = tokenizer.eot_id
    config = {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        **cfg.to_json_dict(),
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "tie_word_embeddings": cfg.tied_unembed,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    _write_json(directory / "config.json", config)
    gen = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    _write_json(directory / "generation_config.json", gen)
    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    if cfg.tied_unembed:  # one tensor on disk; transformers re-ties lm_head on load
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), {"format": "pt"})
    for name in TEMPLATE_FILES:
        shutil.copyfile(TEMPLATE_DIR / name, directory / name)
    (directory / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode() must give the bytes back verbatim
        "split_special_tokens": True,  # a literal "<|endoftext|>" in text is ordinary bytes
        "model_max_length": cfg.block_size,
        "padding_side": "left",  # batched generation continues each row's last real token
    }
    _write_json(directory / "tokenizer_config.json", tok_config)
    _write_json(directory / "special_tokens_map.json", special)


@torch.no_grad()
def verify_export(
    model: GPT,
    tokenizer: Tokenizer,
    directory: str | Path,
    *,
    n_seq: int = 3,
    gen_tokens: int = 8,
    seed: int = 0,
) -> ParityReport:
    """Load ``directory`` with transformers (remote code) and compare it to ``model`` on
    ``n_seq`` random full-context sequences (logits), greedy generation of ``gen_tokens``
    tokens with the cache, a left-padded batch, and the tokenizer on :data:`CHECK_TEXTS`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True).eval()
    model = model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n_seq, cfg.block_size), generator=gen)
    stats = TieStats()
    logits = compare_logits(model, hf, ids, stats)
    prompt_len = max(1, min(8, cfg.block_size - gen_tokens))
    n_new = min(gen_tokens, cfg.block_size - prompt_len)
    gen_eq = compare_generate(model, hf, ids[:, :prompt_len], max_new_tokens=n_new, stats=stats)
    rows = [ids[i, : max(1, cfg.block_size - 3 * i)].tolist() for i in range(n_seq)]
    padded = compare_padded(model, hf, rows, pad_id=tokenizer.eot_id, stats=stats)
    # trust_remote_code only spares the question transformers asks because config.json maps
    # AutoConfig to the shipped code; the tokenizer itself is PreTrainedTokenizerFast.
    hf_tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    same_tok = all(hf_tok.encode(t, verbose=False) == tokenizer.encode(t) for t in CHECK_TEXTS)
    return ParityReport(
        logits=logits["forced"],
        free_logits=logits["free"],
        topk=stats,
        generate_equal=all(gen_eq["forced"]),
        free_generate_equal=all(gen_eq["free"]),
        padded=padded["forced"],
        free_padded=padded["free"],
        tokenizer_equal=same_tok,
    )


def failures(report: ParityReport, *, tie_rtol: float = TIE_RTOL) -> list[str]:
    """What makes ``report`` a mismatch (empty if none): forced logits or padded-batch logits
    beyond ``ATOL + RTOL * max|logit|`` (the position's), an AbsTopK choice of the export's own
    farther than ``tie_rtol`` from the threshold, an AbsTopK output that is not its kept inputs,
    forced generation that differs, or tokenizer ids that differ."""
    failed = []
    tol = f"{ATOL:g} + {RTOL:g} max|logit|"
    if report.logits.n_beyond:
        failed.append(
            f"{report.logits.n_beyond} logits differ by more than {tol} with the same AbsTopK "
            f"selections (max |diff| {report.logits.max_abs:.3g})"
        )
    if not report.topk.worst_gap <= tie_rtol:
        failed.append(
            f"an AbsTopK choice differs {report.topk.worst_gap:.3g} (relative) from the "
            f"threshold (> {tie_rtol:g}, more than rounding)"
        )
    if report.topk.wrong_values:
        failed.append(
            f"the export's AbsTopK returns other values than the kept inputs in "
            f"{report.topk.wrong_values} (token, site) rows"
        )
    if not report.generate_equal:
        failed.append("greedy generation differs")
    if report.padded.n_beyond:
        failed.append(f"a left-padded batch differs by {report.padded.max_abs:.3g}")
    if not report.tokenizer_equal:
        failed.append("AutoTokenizer ids differ")
    return failed


def _resolve(
    model: str | Path | GPT, tokenizer: Tokenizer | str | Path | None
) -> tuple[GPT, Tokenizer]:
    if isinstance(model, GPT):
        if tokenizer is None:
            raise InputError("exporting a model object needs its tokenizer")
        gpt = copy.deepcopy(model).float().cpu().eval()  # the caller's model stays as it was
        mdir = None
    else:
        mdir = resolve_model_dir(model)
        gpt = load_model(mdir)
    if isinstance(tokenizer, Tokenizer):
        return gpt, tokenizer
    return gpt, Tokenizer.load(tokenizer if tokenizer is not None else mdir)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _forget_dynamic_module(directory: Path) -> None:
    """Remove the copy of the code transformers made for the temp directory (its name dies
    with the rename, so the copy would only pile up in the modules cache)."""
    try:
        from transformers.dynamic_module_utils import _sanitize_module_name
        from transformers.utils import HF_MODULES_CACHE
    except ImportError:  # another transformers layout: leave its cache alone
        return
    name = _sanitize_module_name(directory.name)
    if name:
        shutil.rmtree(Path(HF_MODULES_CACHE) / "transformers_modules" / name, ignore_errors=True)
