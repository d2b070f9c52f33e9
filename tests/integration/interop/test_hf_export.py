"""tools/export_hf.py, tools/import_checkpoint.py --format hf and tools/generate.py on trained tiny
checkpoints: transformers' logits equal ours, KV-cache generate = no-cache greedy = tools/generate.py,
the round trip is bitwise, training runs with an HF tokenizer, bad inputs end in one line."""

import json
import os

import pytest
import torch

from megatron_tokenformer.evaluation import load_model
from megatron_tokenformer.interop.checkpoint_format import open_step
from tests.helpers.paths import load_tool
from tests.integration.interop.conftest import LAYOUTS, run_tool

pytestmark = pytest.mark.slow

export_hf = load_tool("export_hf")
import_checkpoint = load_tool("import_checkpoint")
generate = load_tool("generate")

PROMPTS = ["the cat sat on", "birds sang in tall green trees every", "a"]


def _hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    return model, tok


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("exports")
    for key in LAYOUTS:
        path = str(d / f"{key[0]}_{''.join(map(str, key[1]))}")
        assert export_hf.main(["--load", trained[key], "--save", path]) == 0
        out[key] = path
    return out


@pytest.mark.parametrize("key", LAYOUTS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_transformers_logits_equal_ours(key, trained, exports, hf_assets):
    ours, config, _ = load_model(trained[key])
    hf, tok = _hf(exports[key])
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(hf_assets["tokenizer"])
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        assert ids == ref.encode(text).ids  # AutoTokenizer encodes as the tokenizer we trained with
        x = torch.tensor([ids])
        with torch.no_grad():
            a = ours(x)[..., : config.vocab_size]
            b = hf(x).logits
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_folder_contents_and_self_contained_code(exports):
    path = exports[("tokenformer", (1, 1, 1))]
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "configuration_tokenformer.py", "modeling_tokenformer.py",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_tokenformer.TokenformerForCausalLM"
    for name in ("configuration_tokenformer.py", "modeling_tokenformer.py"):
        imports = [ln.split()[1] for ln in open(os.path.join(path, name)) if ln.split()[:1] in (["import"], ["from"])]
        assert {m.split(".")[0] for m in imports} <= {"__future__", "typing", "torch", "transformers",
                                                      "configuration_tokenformer", ""}, imports


def test_round_trip_import_is_bitwise(trained, exports, tmp_path):
    key = ("transformer", (2, 2, 1))
    assert import_checkpoint.main(["--format", "hf", "--input", exports[key], "--save", str(tmp_path / "rt")]) == 0
    a, b = open_step(trained[key]), open_step(str(tmp_path / "rt"))
    assert set(a.params) == set(b.params)
    for name in a.params:
        assert torch.equal(a.read(name), b.read(name)), name
    assert a.config.to_dict() == b.config.to_dict()


def test_sharded_bf16_export_loads(trained, tmp_path):
    key = ("tokenformer", (2, 2, 1))
    out = str(tmp_path / "sharded")
    assert export_hf.main(["--load", trained[key], "--save", out, "--dtype", "bfloat16", "--max-shard-size",
                           "20KB"]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1 and not os.path.exists(os.path.join(out, "model.safetensors"))
    hf, _ = _hf(out)
    assert hf.dtype == torch.bfloat16
    rt = str(tmp_path / "rt")
    assert import_checkpoint.main(["--format", "hf", "--input", out, "--save", rt]) == 0
    view, src = open_step(rt), open_step(trained[key])
    for name in src.params:  # the bf16 export holds bf16(tensor), read back exactly
        assert torch.equal(view.read(name), src.read(name).to(torch.bfloat16).float()), name


@pytest.fixture(scope="module")
def random_export(random_ckpt, tmp_path_factory):
    """random_ckpt exported once for the generation tests."""
    hf_dir = str(tmp_path_factory.mktemp("random_export") / "hf")
    assert export_hf.main(["--load", random_ckpt, "--save", hf_dir]) == 0
    return hf_dir


def test_generate_cache_equals_no_cache_equals_hf(random_ckpt, random_export, capsys):
    capsys.readouterr()
    hf, tok = _hf(random_export)
    outs = {}
    for flags in ([], ["--no-kv-cache"]):
        assert generate.main(["--load", random_ckpt, "--prompt"] + PROMPTS[:2] +
                             ["--greedy", "--max-new-tokens", "12", "--ids"] + flags) == 0
        outs[tuple(flags)] = capsys.readouterr().out.strip().splitlines()
    assert outs[()] == outs[("--no-kv-cache",)]
    for prompt, line in zip(PROMPTS[:2], outs[()]):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        ours = [int(t) for t in line.split()]
        assert len(set(ours)) > 2  # a real continuation, not one repeated token
        for use_cache in (True, False):
            g = hf.generate(ids, max_new_tokens=12, do_sample=False, use_cache=use_cache,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            hf_new = g[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in hf_new:
                hf_new = hf_new[: hf_new.index(tok.eos_token_id)]
            assert hf_new == ours, (prompt, use_cache)
    # batched, left padding: each row equals its own unpadded generation
    tok.padding_side = "left"
    batch = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    g = hf.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    for i, prompt in enumerate(PROMPTS[:2]):
        single = hf.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert g[i, -6:].tolist() == single[0, -6:].tolist()
    # sampled: reproducible with a seed, inside the vocabulary
    torch.manual_seed(0)
    s1 = hf.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.7,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    s2 = hf.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.7,
                     pad_token_id=tok.pad_token_id)
    assert torch.equal(s1, s2) and int(s1.max()) < hf.config.vocab_size


def test_generation_config_sets_only_what_generation_needs(random_export, capsys):
    """generation_config.json holds the special token ids and no max_length: with max_length set, every
    generate(max_new_tokens=...) logged transformers' "Both max_new_tokens and max_length" warning."""
    import logging
    import warnings

    gen = json.load(open(os.path.join(random_export, "generation_config.json")))
    assert "max_length" not in gen and "max_new_tokens" not in gen, gen
    hf, tok = _hf(random_export)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == \
        (tok.eos_token_id, tok.eos_token_id, tok.pad_token_id)

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records = []

        def emit(self, record):
            self.records.append(record.getMessage())

    handler = Records()
    capsys.readouterr()  # what loading printed (a progress bar)
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = hf.generate(**tok(["the cat sat on"], return_tensors="pt"), max_new_tokens=3)
    finally:
        root.removeHandler(handler)
    assert out.shape[1] == len(tok("the cat sat on")["input_ids"]) + 3
    said = handler.records + [str(w.message) for w in caught] + capsys.readouterr().err.splitlines()
    assert not said, said


def test_generate_tp2_equals_tp1(random_ckpt, capsys):
    assert generate.main(["--load", random_ckpt, "--prompt", PROMPTS[1], "--greedy", "--max-new-tokens", "10",
                          "--ids"]) == 0
    tp1 = capsys.readouterr().out.strip()
    res = run_tool("generate", ["--load", random_ckpt, "--prompt", PROMPTS[1], "--greedy", "--max-new-tokens", "10",
                                "--ids"], nproc=2)
    assert res.returncode == 0, res.stdout[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln and all(t.isdigit() for t in ln.split())]
    assert lines == [tp1]  # rank 0 prints, once
    streamed = run_tool("generate", ["--load", random_ckpt, "--prompt", PROMPTS[1], "--greedy", "--max-new-tokens",
                                     "10"])
    assert streamed.returncode == 0
    from megatron_tokenformer.data.tokenizer import load_tokenizer_file
    tok = load_tokenizer_file(os.path.join(random_ckpt, "global_step0", "tokenizer.model"))
    expected = PROMPTS[1] + tok.detokenize(tok.tokenize(PROMPTS[1]) + [int(t) for t in tp1.split()])[
        len(tok.detokenize(tok.tokenize(PROMPTS[1]))):]
    assert expected in streamed.stdout


@pytest.mark.parametrize("argv, needle", [
    (["--load", "/nonexistent/ckpt", "--save", "{tmp}/out"], "--load /nonexistent/ckpt"),
    (["--load", "{ckpt}", "--save", "{tmp}/out", "--dtype", "int8"], "--dtype"),
    (["--load", "{ckpt}", "--save", "{tmp}/out", "--max-shard-size", "lots"], "--max-shard-size"),
    (["--load", "{ckpt}", "--save", "{tmp}/out", "--iteration", "77"], "global_step77"),
    (["--load", "{ckpt}", "--save", "{tmp}/full"], "--save"),
])
def test_export_bad_inputs_one_line_exit_2(argv, needle, random_ckpt, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    argv = [a.format(tmp=tmp_path, ckpt=random_ckpt) for a in argv]
    rc = _call(export_hf.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]


def _call(main, argv):
    """A tool's exit status, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, needle", [
    (["--format", "hf", "--input", "/nonexistent/hf", "--save", "{tmp}/out"], "--input /nonexistent/hf"),
    (["--format", "hf", "--input", "{tmp}", "--save", "{tmp}/out"], "config.json"),
    (["--format", "tokenformer-official", "--input", "{tmp}", "--save", "{tmp}/out"], "--config"),
])
def test_import_hf_bad_inputs_one_line_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc = import_checkpoint.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_generate_bad_inputs_one_line_exit_2(random_ckpt, capsys):
    for argv, needle in ((["--load", random_ckpt], "--prompt"),
                         (["--load", random_ckpt, "--prompt", "x", "--top-p", "0"], "--top-p"),
                         (["--load", random_ckpt, "--prompt", "x", "--temperature", "0"], "--temperature"),
                         (["--load", random_ckpt, "--prompt-file", "/nonexistent/p.txt"], "--prompt-file"),
                         (["--load", "/nonexistent/c", "--prompt", "x"], "--load")):
        rc = generate.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv, err)


def test_sentencepiece_checkpoint_exports_an_equivalent_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    from megatron_tokenformer.config import TokenformerConfig
    from megatron_tokenformer.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from megatron_tokenformer.interop.checkpoint_format import parameter_layout, write_checkpoint
    from tests.integration.interop.conftest import sentences

    model = train_sentencepiece(iter(sentences(9, 300)), str(tmp_path / "sp"), 300, num_threads=1)
    sp = SentencePieceTokenizer(model)
    config = TokenformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=32,
                               vocab_size=sp.vocab_size, qkv_num_param_tokens=8, proj_num_param_tokens=8,
                               ffn_num_param_tokens=8).resolve_taus()
    tensors = {n: torch.randn(shape) for n, (shape, _, _) in parameter_layout(config).items()}
    write_checkpoint(str(tmp_path / "ckpt"), config, tensors, {}, tokenizer_file=model)
    assert export_hf.main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    for text in ["the cat sat", "  two  spaces\nand a new line", " lead", "ünïcödé ✓ 42", "park."]:
        ids = tok(text)["input_ids"]
        assert ids == sp.tokenize(text), text
        assert tok.decode(ids) == sp.detokenize(ids)
    assert tok.eos_token_id == sp.eod


def _overlap_refused(main, argv, capsys, protected):
    """The tool ends with one line naming the overlap; every protected folder is byte-identical."""
    from tests.helpers.ops_checks import tree_hashes
    before = {p: tree_hashes(p) for p in protected}
    rc = _call(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "overlaps the source" in err[0] and "--overwrite or without" in err[0], err
    assert {p: tree_hashes(p) for p in protected} == before
    return err[0]


def test_export_never_deletes_or_writes_into_its_checkpoint(random_ckpt, tmp_path, capsys):
    """Issue 20 item 1: --save RUN --overwrite (or a parent of RUN, or RUN through a symlink) deleted the
    checkpoint it read and exited 0; now refused, the checkpoint byte-identical, nothing beside it."""
    import shutil
    runs = tmp_path / "runs"
    run = runs / "run"
    shutil.copytree(random_ckpt, run)
    (tmp_path / "link").symlink_to(run)
    for save in (run, runs, tmp_path / "link", run / "hf"):
        line = _overlap_refused(export_hf.main, ["--load", str(run), "--save", str(save), "--overwrite"], capsys,
                                [str(run)])
        assert f"--save {save}" in line and f"--load {run}" in line
    _overlap_refused(export_hf.main, ["--load", str(tmp_path / "link"), "--save", str(runs), "--overwrite"], capsys,
                     [str(run)])                                         # --load through the symlink
    assert sorted(os.listdir(runs)) == ["run"] and sorted(os.listdir(tmp_path)) == ["link", "runs"]


def test_import_never_writes_where_it_reads(random_ckpt, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert export_hf.main(["--load", random_ckpt, "--save", str(hf)]) == 0
    capsys.readouterr()
    for save in (hf / "ckpt", tmp_path):            # --save inside --input; --input inside --save
        _overlap_refused(import_checkpoint.main, ["--format", "hf", "--input", str(hf), "--save", str(save)],
                         capsys, [str(hf)])
    official = tmp_path / "official"
    official.mkdir()
    (official / "pytorch_model.bin").write_bytes(b"not read")
    (official / "150M.yml").write_text("{}")
    line = _overlap_refused(import_checkpoint.main, ["--format", "tokenformer-official", "--input",
                                                     str(official / "pytorch_model.bin"), "--config",
                                                     str(official / "150M.yml"), "--save", str(official)],
                            capsys, [str(official)])
    assert line.startswith(f"import_checkpoint.py: error: --save {official} overlaps the source --input")
    assert sorted(os.listdir(tmp_path)) == ["hf", "official"]
