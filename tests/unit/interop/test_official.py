"""tools/import_checkpoint.py --format tokenformer-official.

The reference is an independent re-implementation of the official GPT-NeoX TokenFormer forward,
written here from the official code's math (megatron/model/tokenformer.py, norms.py,
positional_embeddings.py of Haiyang-W/TokenFormer): [s, b, h] layout, Pattention
``f(X Kᵀ) V`` with the official normalisations (no eps, softmax without max subtraction),
non-parametric block LayerNorms, partial rotary (rotate-half on int(head_dim * rotary_pct) channels),
causal softmax attention scaled by 1/sqrt(head_dim), parametric final norm, tied output layer.
A tiny checkpoint in the exact official on-disk forms is built from random tensors: our logits after
the import must equal the reference (fp32, relative 1e-5) for all three norm_activation_types.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_tokenformer.evaluation import load_model
from tests.helpers.paths import load_tool

import_checkpoint = load_tool("import_checkpoint")
expand_checkpoint = load_tool("expand_checkpoint")

L, D, H, N_QKV, N_PROJ, N_FFN, V_PAD, SEQ = 2, 32, 4, 16, 8, 24, 384, 12

YAML = """# a NeoX config as the official ones: YAML with comments, dashes or underscores, Python-style booleans
{{
  "pipe_parallel_size": 1,
  "model_parallel_size": 1,
  "num_layers": {L},
  "hidden_size": {D},
  "num_attention_heads": {H},
  "qkv_slot_num": {N_QKV},
  "proj_slot_num": {N_PROJ},
  "ffn_slot_num": {N_FFN},
  "seq_length": {SEQ},
  "max_position_embeddings": {SEQ},
  "pos_emb": "rotary",
  "rotary_pct": 0.25,
  "no_weight_tying": false,
  "norm": "layernorm_nonparam",
  "final_norm": "layernorm",
  "gpt_j_residual": false,
  "output_layer_parallelism": "column",
  "use_bias_in_attn_linear": false,
  "attention_config": [[["tokenformer"], {L}]],
  "norm_activation_type": "{norm}", # "l2_norm_gelu", "gelu_l2_norm", "softmax"
  "make-vocab-size-divisible-by": 128,
  "checkpoint_validation_with_forward_pass": False,
  "tokenizer-type": "HFTokenizer",
}}
"""


def official_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3):
        return torch.randn(shape, generator=g) * std

    sd = {"sequential.0.word_embeddings.weight": rnd(V_PAD, D, std=0.5)}
    for i in range(L):
        p = f"sequential.{i + 2}."
        for name, n in (("attention.query", N_QKV), ("attention.key", N_QKV), ("attention.value", N_QKV),
                        ("attention.proj", N_PROJ), ("mlp", N_FFN)):
            sd[p + name + ".key_param_tokens"] = rnd(n, D)
            sd[p + name + ".value_param_tokens"] = rnd(n, D)
    sd[f"sequential.{L + 3}.norm.weight"] = 1 + rnd(D, std=0.1)
    sd[f"sequential.{L + 3}.norm.bias"] = rnd(D, std=0.1)
    return sd


# ---------------------------------------------------------------- the official forward, re-derived
def ref_pattention(x, key, value, norm):
    a = x @ key.transpose(-2, -1)
    if norm == "softmax":
        e = torch.exp(a)
        w = e / torch.norm(e, p=1, dim=-1, keepdim=True) * a.shape[-1]
    elif norm == "gelu_l2_norm":
        g = F.gelu(a)
        w = g / torch.norm(g, p=2, dim=-1, keepdim=True) * math.sqrt(g.shape[-1])
    else:
        w = F.gelu(a / torch.norm(a, p=2, dim=-1, keepdim=True) * math.sqrt(a.shape[-1]))
    return w @ value


def ref_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


def ref_forward(sd, ids, norm, rotary_pct=0.25, eps=1e-5):
    """ids [b, s] -> logits [b, s, V_PAD], in the official [s, b, h] layout."""
    x = sd["sequential.0.word_embeddings.weight"][ids].transpose(0, 1)  # [s, b, h]
    s, b, _ = x.shape
    hd = D // H
    rot = int(hd * rotary_pct)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    t = torch.arange(s).type_as(inv_freq)
    emb = torch.cat((torch.einsum("i,j->ij", t, inv_freq),) * 2, dim=-1)
    cos, sin = emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]
    for i in range(L):
        p = f"sequential.{i + 2}."

        def pat(name, inp):
            return ref_pattention(inp, sd[p + name + ".key_param_tokens"], sd[p + name + ".value_param_tokens"], norm)

        h = F.layer_norm(x, (D,), eps=eps)
        q, k, v = (pat(n, h).view(s, b, H, hd) for n in ("attention.query", "attention.key", "attention.value"))
        q_rot, q_pass, k_rot, k_pass = q[..., :rot], q[..., rot:], k[..., :rot], k[..., rot:]
        q = torch.cat(((q_rot * cos) + (ref_rotate_half(q_rot) * sin), q_pass), dim=-1)
        k = torch.cat(((k_rot * cos) + (ref_rotate_half(k_rot) * sin), k_pass), dim=-1)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(hd)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        ctx = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, D)
        x = x + pat("attention.proj", ctx)
        x = x + pat("mlp", F.layer_norm(x, (D,), eps=eps))
    x = F.layer_norm(x, (D,), sd[f"sequential.{L + 3}.norm.weight"], sd[f"sequential.{L + 3}.norm.bias"], eps)
    return (x @ sd["sequential.0.word_embeddings.weight"].t()).transpose(0, 1)


# ---------------------------------------------------------------- on-disk forms
def write_config(tmp_path, norm="l2_norm_gelu", **override):
    text = YAML.format(L=L, D=D, H=H, N_QKV=N_QKV, N_PROJ=N_PROJ, N_FFN=N_FFN, SEQ=SEQ, norm=norm)
    if override:
        head, tail = text.rsplit("}", 1)  # later keys win
        text = head + "".join(f'  "{k}": {json.dumps(v)},\n' for k, v in override.items()) + "}" + tail
    path = tmp_path / f"official_{norm}.yml"
    path.write_text(text)
    return str(path)


def write_bin(tmp_path, sd, name="pytorch_model.bin"):
    path = tmp_path / name
    torch.save(sd, path)
    return str(path)


def write_deepspeed_folder(tmp_path, sd, form):
    """An official DeepSpeed save dir: ``latest`` + global_step5/ with layer files or mp_rank_00."""
    root = tmp_path / f"ds_{form}"
    step = root / "global_step5"
    step.mkdir(parents=True)
    (root / "latest").write_text("global_step5")
    if form == "layers":
        by_layer = {}
        for key, t in sd.items():
            _, idx, rest = key.split(".", 2)
            by_layer.setdefault(int(idx), {})[rest] = t.half()  # module weights in fp16, as fp16 training saves
        for idx, part in by_layer.items():
            torch.save(part, step / f"layer_{idx:02d}-model_00-model_states.pt")
        torch.save({"module": None, "dp_world_size": 1, "mp_world_size": 1, "iteration": 5},
                   step / "mp_rank_00_model_states.pt")
    else:
        torch.save({"module": {k: t.half() for k, t in sd.items()}, "iteration": 5, "dp_world_size": 1},
                   step / "mp_rank_00_model_states.pt")
    return str(root)


def our_logits(save, ids):
    model, config, _ = load_model(save)
    with torch.no_grad():
        return model(ids)[..., : config.vocab_size], config


IDS = torch.tensor([[3, 17, 200, 5, 99, 249, 0, 42, 42, 7, 120, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_bin_logits_equal_official_forward(norm, tmp_path):
    sd = official_state_dict()
    save = str(tmp_path / "ckpt")
    assert import_checkpoint.main(["--format", "tokenformer-official", "--input", write_bin(tmp_path, sd),
                                   "--config", write_config(tmp_path, norm), "--save", save]) == 0
    ours, config = our_logits(save, IDS)
    assert config.vocab_size == V_PAD  # no tokenizer: every padded row is vocabulary
    assert config.qkv_tau == math.sqrt(N_QKV) and config.proj_tau == math.sqrt(N_PROJ) and \
        config.ffn_tau == math.sqrt(N_FFN)
    ref = ref_forward(sd, IDS, norm)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("form", ["layers", "mp_rank"])
def test_deepspeed_folder_logits_equal_official_forward(form, tmp_path):
    sd = official_state_dict(1)
    root = write_deepspeed_folder(tmp_path, sd, form)
    save = str(tmp_path / "ckpt")
    assert import_checkpoint.main(["--format", "tokenformer-official", "--input", root,
                                   "--config", write_config(tmp_path, "gelu_l2_norm"), "--save", save]) == 0
    ours, _ = our_logits(save, IDS)
    ref = ref_forward({k: t.half().float() for k, t in sd.items()}, IDS, "gelu_l2_norm")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_tokenizer_trims_padded_rows_and_is_stored(tmp_path):
    from megatron_tokenformer.data.hf_tokenizer import train_byte_level_bpe
    tok = str(tmp_path / "tok.json")
    train_byte_level_bpe(iter(["the cat sat on the mat"] * 50), tok, 300)
    from megatron_tokenformer.data.tokenizer import build_tokenizer
    vocab = build_tokenizer("HFTokenizer", vocab_file=tok).vocab_size
    sd = official_state_dict(2)
    save = str(tmp_path / "ckpt")
    assert import_checkpoint.main(["--format", "tokenformer-official", "--input", write_bin(tmp_path, sd),
                                   "--config", write_config(tmp_path), "--save", save,
                                   "--tokenizer-type", "HFTokenizer", "--vocab-file", tok]) == 0
    ids = IDS.clamp(max=vocab - 1)
    ours, config = our_logits(save, ids)
    assert config.vocab_size == vocab
    ref = ref_forward(sd, ids, "l2_norm_gelu")[..., :vocab]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert open(os.path.join(save, "global_step0", "tokenizer.model")).read() == open(tok).read()


def test_import_then_grow_x2_keeps_logits(tmp_path):
    sd = official_state_dict(3)
    save, grown = str(tmp_path / "ckpt"), str(tmp_path / "grown")
    assert import_checkpoint.main(["--format", "tokenformer-official", "--input", write_bin(tmp_path, sd),
                                   "--config", write_config(tmp_path), "--save", save]) == 0
    assert expand_checkpoint.main(["--load", save, "--save", grown, "--param-token-growth-factor", "2",
                                   "--target-tensor-model-parallel-size", "2"]) == 0
    before, _ = our_logits(save, IDS)
    after, config = our_logits(grown, IDS)
    assert config.qkv_num_param_tokens == 2 * N_QKV and config.qkv_tau == math.sqrt(N_QKV)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


BAD_CONFIGS = [
    (dict(gpt_j_residual=True), "gpt_j_residual"),
    (dict(no_weight_tying=True), "no_weight_tying"),
    (dict(pos_emb="learned"), "pos_emb"),
    (dict(norm="rmsnorm"), "norm"),
    (dict(final_norm="scalenorm"), "final_norm"),
    (dict(use_bias_in_attn_linear=True), "use_bias_in_attn_linear"),
    (dict(attention_config=[[["global"], L]]), "attention_config"),
    (dict(norm_activation_type="relu"), "norm_activation_type"),
    (dict(num_kv_heads=2), "num_kv_heads"),
    (dict(rotary_pct=0.375), "rotary_pct"),
]


@pytest.mark.parametrize("override, field", BAD_CONFIGS, ids=[b[1] for b in BAD_CONFIGS])
def test_unrepresentable_config_refused(override, field, tmp_path, capsys):
    sd = official_state_dict()
    rc = import_checkpoint.main(["--format", "tokenformer-official", "--input", write_bin(tmp_path, sd), "--config",
                                 write_config(tmp_path, **override), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"field {field}" in err[0], err
    assert not os.path.exists(tmp_path / "out")


def _bad_state_dicts():
    sd = official_state_dict()
    missing = dict(sd)
    del missing["sequential.3.mlp.value_param_tokens"]
    shape = dict(sd)
    shape["sequential.2.attention.query.key_param_tokens"] = torch.zeros(N_QKV + 1, D)
    extra = dict(sd, **{"sequential.2.attention.query.bias": torch.zeros(D)})
    untied = dict(sd, **{f"sequential.{L + 4}.final_linear.weight": torch.zeros(V_PAD, D)})
    return [(missing, "sequential.3.mlp.value_param_tokens"),
            (shape, "sequential.2.attention.query.key_param_tokens"),
            (extra, "sequential.2.attention.query.bias"),
            (untied, f"sequential.{L + 4}.final_linear.weight")]


@pytest.mark.parametrize("case", range(4))
def test_mismatching_state_dict_refused_naming_the_key(case, tmp_path, capsys):
    sd, key = _bad_state_dicts()[case]
    rc = import_checkpoint.main(["--format", "tokenformer-official", "--input", write_bin(tmp_path, sd), "--config",
                                 write_config(tmp_path), "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and key in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_other_bad_inputs(tmp_path, capsys):
    sd = official_state_dict()
    binf, cfg = write_bin(tmp_path, sd), write_config(tmp_path)
    mp = write_deepspeed_folder(tmp_path, sd, "mp_rank")
    torch.save({"module": {}}, os.path.join(mp, "global_step5", "mp_rank_01_model_states.pt"))
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    (tmp_path / "broken.yml").write_text("{ this is: [not valid")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    cases = [
        (["--input", str(tmp_path / "nope.bin"), "--config", cfg], "--input"),
        (["--input", binf, "--config", str(tmp_path / "nope.yml")], "--config"),
        (["--input", binf, "--config", str(tmp_path / "broken.yml")], "--config"),
        (["--input", str(tmp_path / "garbage.bin"), "--config", cfg], "garbage.bin"),
        (["--input", mp, "--config", cfg], "model-parallel"),
        (["--input", binf, "--config", cfg, "--vocab-file", str(tmp_path / "nope.json")], "--vocab-file"),
        (["--input", binf, "--config", cfg, "--target-tensor-model-parallel-size", "3"], "tensor-model-parallel"),
        (["--input", binf, "--config", cfg, "--save", str(tmp_path / "full")], "--save"),
        (["--input", binf], "--config"),
    ]
    for args, needle in cases:
        if "--save" not in args:
            args = args + ["--save", str(tmp_path / "out")]
        try:
            rc = import_checkpoint.main(["--format", "tokenformer-official"] + args)
        except SystemExit as exc:
            rc = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], (args, err)
        assert not os.path.exists(tmp_path / "out")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]


@pytest.mark.parametrize("form, victim", [("layers", "layer_02-model_00-model_states.pt"),
                                          ("mp_rank", "mp_rank_00_model_states.pt")])
def test_deepspeed_folder_with_pickled_code_refused(form, victim, tmp_path, capsys):
    """An official DeepSpeed folder is loaded with torch.load (DeepSpeed's files hold more than tensors):
    its pickle goes through the allowlist first; a payload is refused naming the file and the global, and
    does not run."""
    from tests.helpers.tamper import PAYLOAD_GLOBAL, plant_payload
    root = write_deepspeed_folder(tmp_path, official_state_dict(), form)
    path = os.path.join(root, "global_step5", victim)
    marker = str(tmp_path / "marker")
    plant_payload(path, marker)
    save = tmp_path / "ours"
    rc = import_checkpoint.main(["--format", "tokenformer-official", "--input", root, "--config",
                                 write_config(tmp_path), "--save", str(save)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"import_checkpoint.py: error: --input {path}: refused: its pickle names {PAYLOAD_GLOBAL},")
    assert not os.path.exists(marker) and not save.exists()
