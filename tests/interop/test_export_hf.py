"""``export-hf``: tiny models of every architecture option, exported and loaded back with
transformers offline, must give our logits, generation, hidden states, padding and token ids;
a corrupted export is refused and leaves nothing behind."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecircuits.data import EOT, Tokenizer, train_tokenizer
from sparsecircuits.errors import CheckpointError, InputError
from sparsecircuits.interop import export_hf as ex
from sparsecircuits.interop.hf_parity import greedy_hf
from sparsecircuits.model.config import ALL_LOCS
from tests.model.helpers import tiny_model

transformers = pytest.importorskip("transformers")
SRC = Path(ex.__file__).resolve().parents[1]
VOCAB = 300  # the smallest tokenizer train_tokenizer learns from a few files, and the models'
VARIANTS = {
    "sparse": {},  # sink, bigram table, AbsTopK at the 8 node sites, RMSNorm, added positions
    "tied_layernorm": dict(
        tied_unembed=True, rms_norm=False, sink=False, enable_bigram_table=False, afrac=None
    ),
    "catpos": dict(learned_pos_emb=False, d_pos_emb=8),
    "catpos_sinusoidal": dict(learned_pos_emb=False, d_pos_emb=7, sinusoidal_cat_pos_emb=True),
    "relu_resid": dict(
        residual_activation_type="relu",
        activation_type="relu",
        afrac_loctypes=ALL_LOCS,  # resid_post_attn and resid_post_mlp too
        learnable_bigram_table=True,
        bias=False,
    ),
}
TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n\tpass  # é ✓\r\n", f"s = '{EOT}'\n", "  \n"]


def _offline(mp: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(hub, "HF_HUB_OFFLINE", True)  # read once at import; patch the live value too


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted((SRC / "model").glob("*.py"))[:8]
    return train_tokenizer([p.read_text(encoding="utf-8") for p in files], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory) -> dict[str, tuple]:
    """name -> (our model, export directory, the transformers model loaded from it)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            model = tiny_model(i, vocab_size=VOCAB, **overrides)
            path = ex.export_hf(model, root / name, tokenizer=tok)  # checks parity itself
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            out[name] = (model, path, hf.eval())
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    _offline(monkeypatch)


def _ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_template_imports_only_torch_transformers_and_itself():
    for path in (ex.TEMPLATE_DIR / name for name in ex.TEMPLATE_FILES):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert roots <= {"__future__", "typing", "torch", "transformers"}, (path.name, roots)


def test_config_json_carries_our_fields_and_the_auto_map(exported, tok):
    model, path, _ = exported["tied_layernorm"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "sparsecircuits_gpt"
    assert cfg["architectures"] == ["SparseCircuitsForCausalLM"]
    assert set(cfg["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    assert model.config.to_json_dict().items() <= cfg.items()
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == cfg["pad_token_id"] == tok.eot_id
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "float32"


@pytest.mark.parametrize("name", ["sparse", "tied_layernorm"])
def test_weights_keep_our_state_dict_names(exported, name):
    from safetensors import safe_open

    model, path, hf = exported[name]
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    ours = set(model.state_dict())
    if model.config.tied_unembed:  # stored once, re-tied on load
        assert keys == ours - {"lm_head.weight"}
        assert hf.lm_head.weight is hf.transformer.wte.weight
    else:
        assert keys == ours


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_generation_and_hidden_states_match(exported, name):
    model, _, hf = exported[name]
    ids = _ids(3, model.config.block_size)
    with torch.no_grad():
        ours, cache = model.run_with_cache(ids, names=["final_resid", "0.resid_in", "1.resid_in"])
        out = hf(input_ids=ids, output_hidden_states=True)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert (out.logits - ours).abs().max() <= 1e-5
    # GPT-2's convention: each block's input, then ln_f of the last residual.
    hidden = out.hidden_states
    assert len(hidden) == model.config.n_layer + 1
    for i in range(model.config.n_layer):
        assert (hidden[i] - cache[f"{i}.resid_in"]).abs().max() <= 1e-5
    final = model.transformer.ln_f(cache["final_resid"])
    assert (hidden[-1] - final).abs().max() <= 1e-5
    prompts = ids[:, :6]
    expected = model.generate(prompts, max_new_tokens=12, temperature=0.0)  # cached
    assert torch.equal(greedy_hf(hf, prompts, max_new_tokens=12), expected)


@pytest.mark.parametrize("name", ["sparse", "catpos", "relu_resid"])
def test_left_padded_batch_equals_rows_alone(exported, tok, name):
    model, _, hf = exported[name]
    rows = [_ids(1, n, seed=n)[0].tolist() for n in (24, 17, 9)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.eot_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batch = hf(input_ids=ids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            ours, _ = model(torch.tensor([r]))
            assert (batch[b, width - len(r) :] - ours[0]).abs().max() <= 1e-5
    # Batched generation from the padded prompts continues each row as it would alone.
    short = [r[:5] for r in rows[1:]] + [rows[0][:3]]
    ids = torch.tensor([[tok.eot_id] * (5 - len(r)) + r for r in short])
    mask = (torch.arange(5) >= torch.tensor([5 - len(r) for r in short])[:, None]).long()
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=[])
    for b, r in enumerate(short):
        alone = model.generate(torch.tensor([r]), max_new_tokens=6, temperature=0.0)
        assert got[b, 5:].tolist() == alone[0, len(r) :].tolist()


def test_positions_beyond_the_context_are_an_error(exported):
    _, _, hf = exported["sparse"]
    with pytest.raises(ValueError, match="block_size 24"):
        hf(input_ids=_ids(1, 25))
    with pytest.raises(ValueError, match="block_size 24"):
        greedy_hf(hf, _ids(1, 20), max_new_tokens=8)


def test_attention_maps_are_refused_not_silently_dropped(exported):
    _, _, hf = exported["sparse"]
    with pytest.raises(ValueError, match="output_attentions"):
        hf(input_ids=_ids(1, 4), output_attentions=True)


def test_labels_give_our_loss_and_the_base_model_loads(exported):
    model, path, hf = exported["sparse"]
    ids = _ids(2, 16)
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
        assert abs(float(hf(input_ids=ids, labels=ids).loss) - float(loss)) <= 1e-5
        base = transformers.AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        final = model.transformer.ln_f(
            model.run_with_cache(ids, names=["final_resid"])[1]["final_resid"]
        )
        assert (base(input_ids=ids).last_hidden_state - final).abs().max() <= 1e-5


def test_auto_tokenizer_gives_our_ids(exported, tok):
    _, path, _ = exported["sparse"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)  # stdin is captured: no question
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == hf_tok.pad_token == EOT
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == tok.eot_id
    for text in TEXTS:
        assert hf_tok.encode(text) == tok.encode(text)  # no BOS, a typed EOT is plain bytes
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_pipeline_and_nnsight_run(exported):
    model, path, hf = exported["sparse"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok)
    text = pipe("def f(", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("def f(")
    nnsight = pytest.importorskip("nnsight")
    lm = nnsight.LanguageModel(hf, tokenizer=hf_tok)
    with lm.trace("def f(x):"):
        read = lm.transformer.h[0].mlp.output.save()
    ids = torch.tensor([hf_tok.encode("def f(x):")])
    _, cache = model.run_with_cache(ids, names=["0.mlp.resid_delta"])
    assert (read.detach() - cache["0.mlp.resid_delta"]).abs().max() <= 1e-5


CORRUPTIONS = {
    "tanh GELU": ("F.gelu(h)", 'F.gelu(h, approximate="tanh")'),  # arithmetic
    "top-k of x, not |x|": ("torch.topk(x.abs(), k", "torch.topk(x, k"),  # the selection
    # the right entries, wrong values: the forced run rebuilds AbsTopK from x and cannot see it
    "kept values made positive": ("x.gather(-1, idx))", "x.gather(-1, idx).abs())"),
    # a template that does not even load: still one line, still nothing written
    "raises on import": ("import torch.nn.functional as F\n",
                         "import torch.nn.functional as F\nraise RuntimeError('broken')\n"),
}  # fmt: skip


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupted_template_is_refused_and_leaves_nothing(tok, tmp_path, monkeypatch, corruption):
    old, new = CORRUPTIONS[corruption]
    bad = tmp_path / "template"
    bad.mkdir()
    for name in ex.TEMPLATE_FILES:
        text = (ex.TEMPLATE_DIR / name).read_text(encoding="utf-8")
        if name.startswith("modeling"):
            assert old in text
            text = text.replace(old, new)
        (bad / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(ex, "TEMPLATE_DIR", bad)
    out = tmp_path / "exports" / "model"
    with pytest.raises(CheckpointError, match="refused") as err:
        ex.export_hf(tiny_model(0, vocab_size=VOCAB), out, tokenizer=tok)
    assert "\n" not in str(err.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no OUT, no temp dir


def test_corrupted_weights_are_refused(tok, tmp_path, monkeypatch):
    save = ex.save_file

    def perturbed(state, path, metadata):
        state = {**state, "final_logits_bias": state["final_logits_bias"] + 1e-3}
        save(state, path, metadata)

    monkeypatch.setattr(ex, "save_file", perturbed)
    out = tmp_path / "model"
    with pytest.raises(CheckpointError, match="logits differ"):
        ex.export_hf(tiny_model(0, vocab_size=VOCAB), out, tokenizer=tok)
    assert not out.exists()


def test_an_existing_out_needs_overwrite(exported, tok, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    model = exported["sparse"][0]
    with pytest.raises(InputError, match="already exists"):
        ex.export_hf(model, out, tokenizer=tok, check=False)
    ex.export_hf(model, out, tokenizer=tok, check=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_cli_exports_a_model_directory(tok, tmp_path):
    from typer.testing import CliRunner

    from sparsecircuits import cli
    from sparsecircuits.model.io import save_model

    mdir = tmp_path / "model"
    save_model(tiny_model(1, vocab_size=VOCAB), mdir)
    tok.save(mdir)
    res = CliRunner().invoke(cli.app, ["export-hf", str(mdir), str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "checked against sparsecircuits" in res.output
    assert (tmp_path / "hf" / "modeling_sparsecircuits.py").exists()


@pytest.mark.parametrize("name", ["sparse", "tied_layernorm", "catpos"])
def test_load_model_reads_the_export_back_exactly(exported, name):
    """The export is also a model directory of ours: same config, same tensors, same hash."""
    from sparsecircuits.model.io import load_model, weights_hash

    model, path, _ = exported[name]
    back = load_model(path)
    assert back.config == model.config
    assert weights_hash(back) == weights_hash(model)
    ids = _ids(2, 12)
    torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=0, rtol=0)


@pytest.mark.slow
def test_export_loads_offline_without_our_package(exported, tmp_path):
    """In a fresh interpreter where ``import sparsecircuits`` fails, with HF_HUB_OFFLINE=1."""
    model, path, _ = exported["catpos"]
    ids = _ids(2, 20)
    torch.save({"ids": ids, "logits": model(ids)[0].detach()}, tmp_path / "expected.pt")
    code = f"""
import sys
sys.modules["sparsecircuits"] = None  # the export must not need the package
import torch, transformers
exp = torch.load({str(tmp_path / "expected.pt")!r})
m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
tok = transformers.AutoTokenizer.from_pretrained({str(path)!r})
with torch.no_grad():
    d = (m(input_ids=exp["ids"]).logits - exp["logits"]).abs().max().item()
print("DIFF", d, type(tok).__name__, tok.encode("def f"))
"""
    env = {
        **__import__("os").environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,  # AutoTokenizer's remote-code question gets EOF: no
    )
    assert res.returncode == 0, res.stderr[-2000:]
    # The tokenizer's question (answered by EOF) leaves its prompt on stdout, unterminated.
    line = res.stdout[res.stdout.index("DIFF") :].split()
    assert float(line[1]) <= 1e-5, res.stdout
    assert line[2] in ("TokenizersBackend", "PreTrainedTokenizerFast"), res.stdout


@pytest.mark.slow
def test_the_shipped_sparse_model_exports(tmp_path):
    """A trained model meets AbsTopK near-ties that a random tiny one does not: the check must
    tell those from errors (hf_parity), or the shipped models could not be exported."""
    out = ex.export_hf("stdlib-sparse", tmp_path / "hf")
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
