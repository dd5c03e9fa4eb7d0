"""``/v1/embeddings`` on a live server over a tiny random Qwen3 embedding checkpoint (a
sentence-transformers directory: last-token pooling, normalised), against
sentence-transformers itself; and the refusals of a server that is not for embeddings."""

import base64
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

from conftest import ROOT, _free_port, wait_ready

TEXTS = ["The capital of France is Paris.", "Hello", "A longer sentence about the sea, the sky and the wind "
         "that blows over both of them all day long."]


def make_embedding_checkpoint(path, tokenizer_dir, pooling="lasttoken"):
    """A sentence-transformers directory (modules.json, 1_Pooling, 2_Normalize) over a random
    bare Qwen3Model saved as AutoModel saves it (keys without ``model.``, no head)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.pad_token = tok.eos_token
    # Without a chat template: sentence-transformers would otherwise render a text input as a
    # chat message before embedding it (embedding checkpoints carry none).
    tok.chat_template = None
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = path.parent / f"{path.name}-hf"
    transformers.Qwen3Model(cfg).eval().save_pretrained(hf)
    tok.save_pretrained(hf)
    st = SentenceTransformer(modules=[models.Transformer(str(hf)), models.Pooling(64, pooling_mode=pooling),
                                      models.Normalize()], device="cpu")
    st.save(str(path))
    return SentenceTransformer(str(path), device="cpu")


@pytest.fixture(scope="module")
def embedder(default_checkpoint, tmp_path_factory):
    """(openai client, the server's URL, the sentence-transformers reference model)."""
    root = tmp_path_factory.mktemp("embed")
    reference = make_embedding_checkpoint(root / "tiny-embed", default_checkpoint)
    port = _free_port()
    log = root / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "api_server", str(root / "tiny-embed"),
             "--server-name", "127.0.0.1", "--server-port", str(port), "--session-len", "128",
             "--max-batch-size", "4", "--log-level", "INFO"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**__import__("os").environ, "XLA_FLAGS": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, [proc], log)
        yield openai.OpenAI(base_url=url + "/v1", api_key="x"), url, reference, log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_embeddings_match_sentence_transformers(embedder):
    client, _, reference, log = embedder
    assert "last pooling, normalised" in log.read_text()  # read from the checkpoint's modules
    want = reference.encode(TEXTS, batch_size=1, convert_to_numpy=True)
    got = client.embeddings.create(model="tiny-embed", input=TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == want.shape == (3, 64)
    np.testing.assert_allclose(vectors, want, atol=1e-5)
    n = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert got.usage.prompt_tokens == got.usage.total_tokens == n


def test_a_mixed_batch_equals_one_input_at_a_time(embedder):
    client = embedder[0]
    together = [d.embedding for d in client.embeddings.create(model="tiny-embed", input=TEXTS).data]
    alone = [client.embeddings.create(model="tiny-embed", input=t).data[0].embedding for t in TEXTS]
    assert together == alone  # the same floats, whatever shares the prefill call
    ids = embedder[2].tokenizer(TEXTS[0])["input_ids"]
    by_ids = client.embeddings.create(model="tiny-embed", input=[ids]).data[0].embedding
    assert by_ids == alone[0]


def test_base64_decodes_to_the_same_floats(embedder):
    _, url, _, _ = embedder
    body = {"model": "tiny-embed", "input": TEXTS[:2]}
    floats = httpx.post(url + "/v1/embeddings", json=body).json()["data"]
    b64 = httpx.post(url + "/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"]
    for f, b in zip(floats, b64):
        assert np.frombuffer(base64.b64decode(b["embedding"]), "<f4").tolist() == f["embedding"]


def test_dimensions_truncate_then_renormalise(embedder):
    client = embedder[0]
    full = np.array(client.embeddings.create(model="tiny-embed", input=TEXTS[0]).data[0].embedding)
    short = np.array(client.embeddings.create(model="tiny-embed", input=TEXTS[0], dimensions=16).data[0].embedding)
    assert short.shape == (16,)
    np.testing.assert_allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="tiny-embed", input="x", dimensions=65)


def test_an_embedding_server_refuses_generation_and_bad_input(embedder):
    client = embedder[0]
    with pytest.raises(openai.BadRequestError, match="--task embed"):
        client.chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        client.embeddings.create(model="tiny-embed", input="x", encoding_format="int8")
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="tiny-embed", input=[])
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.embeddings.create(model="tiny-embed", input=[[10 ** 7]])


def test_a_generating_server_says_how_to_start_one_for_embeddings(server):
    r = httpx.post(server + "/v1/embeddings", json={"input": "hello"})
    assert r.status_code == 400
    assert "--task embed" in r.json()["error"]["message"]


def test_readme_snippet_and_apiclient_embed(embedder):
    import re

    from service.client import APIClient

    _, url, reference, _ = embedder
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                if "embeddings.create" in b]
    r = subprocess.run([sys.executable, "-c", block.replace("http://localhost:23334", url)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["2", "64"]
    with APIClient(url) as api:
        out = api.embeddings_v1(model=api.available_models[0], input=TEXTS[:1], dimensions=8)
    want = reference.encode(TEXTS[:1], convert_to_numpy=True)[0][:8]
    np.testing.assert_allclose(out["data"][0]["embedding"], want / np.linalg.norm(want), atol=1e-5)
