"""Image input (Gemma 3): preprocessing equal to the HF image processor's, the vision tower and
the language model's two-way attention inside an image equal to transformers', on both device
paths, through the engine and over HTTP."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from model import transformer
from model import vision
from model.backends import cpu as cpu_kernels
from model.checkpoint import load_config, load_params, load_vision
from model.convert import convert

VOCAB = 160
BOI, EOI, IMAGE = 157, 158, 159
TOKENS_PER_IMAGE = 4
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
            "{% if part['type'] == 'image' %}<start_of_image>{% else %}{{ part['text'] }}{% endif %}"
            "{% endfor %}{% endif %} w3 {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def write_tokenizer(path):
    """Words w0..w156, the roles as words, and Gemma 3's image tokens as special tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(150)}
    for i, role in enumerate(("<system>", "<user>", "<assistant>", "<tool>")):
        vocab[role] = 150 + i
    vocab.update({f"w{i}": i for i in range(154, BOI)})
    vocab.update({"<start_of_image>": BOI, "<end_of_image>": EOI, "<image_soft_token>": IMAGE})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<start_of_image>", special=True), AddedToken("<end_of_image>", special=True),
                            AddedToken("<image_soft_token>", special=True)])
    assert tok.token_to_id("<image_soft_token>") == IMAGE
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "w1", "eos_token": "w2", "chat_template": TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 56, "width": 56},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
         "do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 2}))


def make_gemma3_vlm(path, seed=0, sliding_window=6):
    """A tiny Gemma 3 vision-language checkpoint: a 56-pixel image is 4x4 patches of 14,
    pooled 2x2 into 4 soft tokens; 3 text layers, the middle one global."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                max_position_embeddings=256, rms_norm_eps=1e-5, num_attention_heads=4, num_key_value_heads=1,
                head_dim=32, query_pre_attn_scalar=32, sliding_window=sliding_window,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=56, patch_size=14),
        mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and a non-zero projection, so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("mm_input_projection_weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def picture(seed, size=(40, 30)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3-vlm")
    model = make_gemma3_vlm(root / "hf")
    convert(root / "hf", root / "converted", progress=False)
    return model, root / "converted"


def image_prompt(text_before, images, text_after):
    """Token ids as Gemma 3's processor expands ``<start_of_image>``: the image's soft tokens
    between its begin and end tokens (the word-level tokenizer has no newlines to add)."""
    ids = list(text_before)
    for _ in range(images):
        ids += [BOI] + [IMAGE] * TOKENS_PER_IMAGE + [EOI] + [int(x) for x in text_after[:2]]
    return ids + list(text_after)


def hf_logits(model, ids, pixels):
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=ids_t, pixel_values=torch.tensor(pixels) if len(pixels) else None,
                    token_type_ids=(ids_t == IMAGE).long(), attention_mask=torch.ones_like(ids_t))
    return out.logits[0].float().numpy()


@pytest.mark.parametrize("size", [(56, 56), (40, 30), (7, 90), (300, 17)])
def test_preprocessing_equals_the_hf_image_processor(vlm, size):
    """Our numpy/Pillow pixels equal Gemma 3's HF image processor's (its Pillow path) for
    square, small, and extreme aspect ratios."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    _, converted = vlm
    vc = load_vision(converted)
    ours = vision.Preprocessor.of(converted, vc)(picture(1, size))
    ref = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    want = ref(picture(1, size), return_tensors="np")["pixel_values"][0]
    assert ours.shape == want.shape == (3, 56, 56)
    assert np.abs(ours - want).max() <= 1e-6


def test_vision_tower_equals_transformers_image_features(vlm):
    model, converted = vlm
    vc = load_vision(converted)
    pre = vision.Preprocessor.of(converted, vc)
    pixels = np.stack([pre(picture(s)) for s in (1, 2)])
    with torch.no_grad():
        want = model.get_image_features(torch.tensor(pixels)).pooler_output.float().numpy()
    got = np.asarray(vision.encode(vision.load(converted, vc), vc, jnp.asarray(pixels)))
    assert got.shape == want.shape == (2, TOKENS_PER_IMAGE, 64)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("kernels", [False, True])
def test_language_model_with_images_equals_transformers_logits(vlm, kernels):
    """A prompt with two images (the second past the sliding window of the first): every
    position's logits equal transformers', which attends within each image both ways."""
    if kernels and not cpu_kernels.available():
        pytest.skip("the CPU kernels do not build here")
    model, converted = vlm
    cfg, vc = load_config(converted), load_vision(converted)
    pre = vision.Preprocessor.of(converted, vc)
    pixels = np.stack([pre(picture(s)) for s in (3, 4)])
    ids = image_prompt([1, 151, 20, 21], 2, [30, 31, 32, 152])
    want = hf_logits(model, ids, pixels)
    backend = cpu_kernels.CpuKernels() if kernels else transformer.XLA
    params = transformer.prepare(load_params(converted, cfg), cfg, backend)
    feats = np.asarray(vision.encode(vision.load(converted, vc), vc, jnp.asarray(pixels))).reshape(-1, 64)
    t = len(ids)
    use = np.asarray(ids) == IMAGE
    embeds = np.zeros((t, 64), np.float32)
    embeds[use] = feats
    limits = np.arange(t)
    for s in np.flatnonzero(use & ~np.roll(use, 1)):  # each image's tokens see its last
        e = s
        while e + 1 < t and use[e + 1]:
            e += 1
        limits[s:e + 1] = e
    cache = transformer.init_cache(cfg, 1, 64, backend=backend)
    hidden, _ = transformer.forward(params, cfg, jnp.asarray([ids]), jnp.arange(t)[None], cache, span=64,
                                    backend=backend, images=(jnp.asarray(embeds)[None], jnp.asarray(use)[None],
                                                             jnp.asarray(limits, jnp.int32)[None]))
    got = np.asarray(transformer.logits(params, cfg, hidden))[0]
    assert np.abs(got - want).max() <= 1e-4


def hf_greedy(model, ids, pixels, n):
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=torch.tensor(pixels),
                             token_type_ids=(ids_t == IMAGE).long(), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def build(converted, path, num_blocks=40, speculation=None):
    """An engine over the converted model on the XLA path, the CPU kernels, the GPU kernel
    (interpreted), or a tp=2 mesh
    (``num_blocks`` of 16 positions; ``speculation``: the engine's, default none)."""
    from model.backends.xla import Xla
    from model.tokenizer import Tokenizer
    from service.engine import Engine
    from service.engine.config import EngineConfig
    from service.engine.runner import ModelRunner
    from service.models import build_runner, load_tower

    config = EngineConfig(max_batch_size=4, session_len=96, max_prefill_chunk=16, block_size=16, num_blocks=40,
                          tp=2 if path == "tp2" else 1)
    if path == "tp2":
        runner, tokenizer = build_runner(converted, config)
    else:
        cfg = load_config(converted)
        from model.backends.gpu import GpuKernels

        backend = {"xla": Xla(), "gpu-interpret": GpuKernels(interpret=True)}.get(path)
        runner = ModelRunner(cfg, load_params(converted, cfg), 4, 96, max_prefill_chunk=16, block_size=16,
                             num_blocks=num_blocks, backend=backend,
                             vision=load_tower(converted, cfg, config, None, None))
        tokenizer = Tokenizer.from_dir(converted)
    engine = Engine(runner, tokenizer, speculation=speculation)
    engine.start()
    return engine


def run(engine, jobs):
    """Submit every (ids, images, params) at once; their token lists."""
    import asyncio

    async def one(ids, ims, params):
        toks = []
        async for out in engine.generate(ids, params, images=ims):
            toks += out.token_ids
        return toks

    async def main():
        return await asyncio.gather(*(one(*j) for j in jobs))

    return asyncio.run(main())


@pytest.mark.parametrize("path", ["xla", "kernels", "gpu-interpret", "tp2"])
def test_engine_greedy_with_images_equals_transformers_and_is_batch_invariant(vlm, path):
    """Greedy 12 tokens of a one-image and a two-image prompt equal transformers' generate
    (chunks of 16 tokens: every image lands whole in a call, the cut moving chunk ends); the
    same requests together with a text-only one give each what it gets alone; a repeated image
    is encoded once, and a different image behind the same tokens gets no prefix-cache hit."""
    from service.engine.images import image_of
    from service.params import SamplingParams

    if path == "kernels" and not cpu_kernels.available():
        pytest.skip("the CPU kernels do not build here")
    model, converted = vlm
    vc = load_vision(converted)
    pre = vision.Preprocessor.of(converted, vc)
    pics = {s: pre(picture(s, (30 + 7 * s, 50))) for s in (5, 6, 7)}
    one = image_prompt([1, 151, 20, 21, 22, 23, 24, 25, 26, 27, 28], 1, [30, 31, 152])
    two = image_prompt([1, 151, 40, 41, 42], 2, [43, 44, 45, 46, 47, 152])
    text = [1, 151, 60, 61, 62, 152]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want_one = hf_greedy(model, one, pics[5][None], 12)
    want_two = hf_greedy(model, two, np.stack([pics[6], pics[7]]), 12)
    engine = build(converted, path)
    try:
        alone = [run(engine, [job])[0] for job in [
            (one, [image_of(pics[5])], greedy), (two, [image_of(pics[6]), image_of(pics[7])], greedy),
            (text, [], greedy)]]
        assert alone[0] == want_one
        assert alone[1] == want_two
        encoded = engine.encoder_cache.encoded
        assert encoded == 3
        together = run(engine, [(one, [image_of(pics[5])], greedy), (text, [], greedy),
                                (two, [image_of(pics[6]), image_of(pics[7])], greedy)])
        assert together == [alone[0], alone[2], alone[1]]
        assert engine.encoder_cache.encoded == encoded  # every image came from the encoder cache
        # The one-image prompt with another picture: same token ids, no cached block past the image.
        hits = engine.blocks.hits
        other = run(engine, [(one, [image_of(pics[7])], greedy)])[0]
        first_image_block = one.index(IMAGE) // 16
        assert engine.blocks.hits - hits <= first_image_block
        assert other == hf_greedy(model, one, pics[7][None], 12)
    finally:
        engine.stop()


def png_bytes(seed, size=(40, 30), fmt="PNG"):
    import io

    buf = io.BytesIO()
    picture(seed, size).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data, kind="image/png"):
    import base64

    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def http(vlm, tmp_path_factory):
    """The app over an engine of the tiny model (XLA path) on a real port (uvicorn in a
    thread): local files allowed under one folder, at most 2 images a request, fetches timing
    out after 1 s and limited to 50 kB."""
    import socket
    import threading
    import time as _time

    import httpx
    import uvicorn

    from service.app import ServerSettings, State, create_app
    from service.media import MediaSettings

    model, converted = vlm
    folder = tmp_path_factory.mktemp("media")
    engine = build(converted, "xla")
    engine.image_processor = vision.Preprocessor.of(converted, load_vision(converted))
    media = MediaSettings(limit_per_prompt=2, allowed_local_path=str(folder), fetch_timeout=1.0, max_bytes=50_000)
    app = create_app(State(ServerSettings(model_name="tiny-vlm", media=media), engine))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        _time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, engine, model, folder
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()


def chat(client, content, **extra):
    body = {"model": "tiny-vlm", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body)


def test_chat_with_an_image_equals_transformers_over_http(http):
    """A data: URL image in an OpenAI chat: the template's image place expanded to the image's
    tokens as Gemma 3's processor does, and the answer is transformers' greedy continuation."""
    client, engine, model, _ = http
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(5))}}
    r = chat(client, [{"type": "text", "text": "w20 w21"}, image, {"type": "text", "text": "w22"}])
    assert r.status_code == 200, r.text
    body = r.json()
    ids = body["prompt_token_ids"]
    assert ids.count(IMAGE) == TOKENS_PER_IMAGE and ids.count(BOI) == 1 and ids.count(EOI) == 1
    start = ids.index(IMAGE)
    assert ids[start - 1] == BOI and ids[start + TOKENS_PER_IMAGE] == EOI
    pixels = engine.image_processor(picture(5))[None]
    assert body["choices"][0]["token_ids"] == hf_greedy(model, ids, pixels, 8)


def test_openai_and_anthropic_sdks_send_base64_images(http):
    """The SDKs' own request shapes (chat image_url, Responses input_image, Messages image
    block) reach the model with the same image: one answer."""
    import anthropic
    import openai

    client, _, _, _ = http
    url = data_url(png_bytes(8))
    oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="x")
    chat_answer = oai.chat.completions.create(model="tiny-vlm", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "w30"}]}]).choices[0].message.content
    resp = oai.responses.create(model="tiny-vlm", max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": "w30"}]}])
    ant = anthropic.Anthropic(base_url=str(client.base_url), api_key="x")
    msg = ant.messages.create(model="tiny-vlm", max_tokens=6, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": url.split(",", 1)[1]}},
            {"type": "text", "text": "w30"}]}])
    assert chat_answer
    assert resp.output_text == chat_answer
    assert msg.content[0].text == chat_answer


def test_local_files_only_under_the_allowed_folder(http, tmp_path):
    client, _, _, folder = http
    (folder / "cat.png").write_bytes(png_bytes(9))
    (tmp_path / "outside.png").write_bytes(png_bytes(9))
    inside = chat(client, [{"type": "image_url", "image_url": {"url": f"file://{folder / 'cat.png'}"}}])
    assert inside.status_code == 200, inside.text
    for url in (f"file://{tmp_path / 'outside.png'}", f"{folder}/../{tmp_path.name}/outside.png"):
        r = chat(client, [{"type": "image_url", "image_url": {"url": url}}])
        assert r.status_code == 400 and "outside --allowed-local-media-path" in r.json()["error"]["message"]


@pytest.mark.parametrize("content, says", [
    ([{"type": "image_url", "image_url": {"url": data_url(b"not an image at all")}}], "not a readable image"),
    ([{"type": "image_url", "image_url": {"url": data_url(png_bytes(1, fmt="BMP"), "image/bmp")}}], "BMP images"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "not valid base64"),
    ([{"type": "image_url", "image_url": {"url": data_url(png_bytes(1, (400, 400)))}}], "bytes allowed"),
    ([{"type": "image_url", "image_url": {"url": data_url(png_bytes(s))}} for s in (1, 2, 3)],
     "--limit-mm-per-prompt"),
    ([{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}], "scheme 'ftp'"),
    ([{"type": "text", "text": "<start_of_image> w5"},
      {"type": "image_url", "image_url": {"url": data_url(png_bytes(1))}}],
     "image placeholder"),
])
def test_bad_images_are_a_400_naming_messages_and_the_server_keeps_serving(http, content, says):
    client, _, _, _ = http
    r = chat(client, content)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["param"] == "messages"
    assert chat(client, [{"type": "text", "text": "w20"}]).status_code == 200


def test_image_urls_fetched_with_limits(http):
    """http(s) image URLs, from a local server: served as image/png; a wrong content type, a
    404, a body over the size limit and a fetch past the timeout are each a 400."""
    import http.server as hs
    import threading
    import time as _time

    ok = png_bytes(11)

    class Handler(hs.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/slow.png":
                _time.sleep(3)
            body, kind, code = {"/ok.png": (ok, "image/png", 200), "/page": (b"<html>", "text/html", 200),
                                "/big.png": (b"x" * 60_000, "image/png", 200),
                                "/slow.png": (ok, "image/png", 200)}.get(self.path, (b"", "text/plain", 404))
            try:
                self.send_response(code)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass

    server = hs.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    client, _, _, _ = http
    try:
        same = chat(client, [{"type": "image_url", "image_url": {"url": data_url(ok)}}])
        fetched = chat(client, [{"type": "image_url", "image_url": {"url": f"{base}/ok.png"}}])
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"][0]["token_ids"] == same.json()["choices"][0]["token_ids"]
        for path, says in (("/page", "not an image"), ("/missing.png", "HTTP 404"), ("/big.png", "bytes allowed"),
                           ("/slow.png", "timed out")):
            r = chat(client, [{"type": "image_url", "image_url": {"url": base + path}}])
            assert r.status_code == 400 and says in r.json()["error"]["message"], (path, r.text)
    finally:
        server.shutdown()


def test_images_to_a_text_model_are_refused(default_checkpoint):
    from litestar.testing import TestClient

    from conftest import tiny_engine
    from service.app import ServerSettings, State, create_app

    engine = tiny_engine(default_checkpoint, 2)
    try:
        with TestClient(create_app(State(ServerSettings(model_name="tiny-vlm"), engine))) as client:
            r = chat(client, [{"type": "image_url", "image_url": {"url": data_url(png_bytes(1))}}])
            assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]
    finally:
        engine.stop()


def test_readme_snippet_sends_an_image(http, tmp_path):
    """The README's image snippet, run as written (its file and model names aside) against the
    tiny model's server."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    client, _, _, _ = http
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme[readme.index("## Images"):], re.S)[1]
    picture(4).save(tmp_path / "photo.png")
    code = (block.replace("http://localhost:23333", str(client.base_url)).replace("gemma-3-4b-it", "tiny-vlm")
            .replace("What is in this picture?", "w20 w21"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_no_compiles_after_warmup_for_any_image_or_image_count(vlm):
    """After warm-up (the tower's batch buckets and every step shape, image rows included),
    requests with images of other sizes, one to three at once, and text alone compile nothing."""
    from service.engine.images import image_of
    from service.params import SamplingParams

    _, converted = vlm
    pre = vision.Preprocessor.of(converted, load_vision(converted))
    engine = build(converted, "xla")
    try:
        engine.runner.warmup()
        before = engine.runner.compiled_variants()
        greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        one = image_prompt([1, 151, 20], 1, [30, 152])
        jobs = [(one, [image_of(pre(picture(20 + i, (17 + 31 * i, 90 - 11 * i))))], greedy) for i in range(3)]
        run(engine, jobs[:1])
        run(engine, jobs)
        run(engine, [([1, 151, 20, 152], [], greedy)] + jobs[1:])
        assert engine.runner.compiled_variants() == before
    finally:
        engine.stop()


def test_images_with_ngram_speculation_and_preemption_keep_transformers_tokens(vlm):
    """N-gram drafts checked by the model, and a block pool too small for three image prompts
    at once (sequences preempted and recomputed with their kept image features): each answer
    is still transformers' greedy one, and no image is encoded twice."""
    from service.engine.images import image_of
    from service.engine.speculate import Speculation
    from service.params import SamplingParams

    model, converted = vlm
    pre = vision.Preprocessor.of(converted, load_vision(converted))
    pics = [pre(picture(30 + i, (20 + 9 * i, 40))) for i in range(3)]
    prompts = [image_prompt([1, 151, 20 + i, 21, 22, 23], 1, [30, 31, 30, 31, 152]) for i in range(3)]
    want = [hf_greedy(model, ids, px[None], 20) for ids, px in zip(prompts, pics)]
    engine = build(converted, "xla", num_blocks=7, speculation=Speculation("ngram", 4, 4))
    try:
        greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        got = run(engine, [(ids, [image_of(px)], greedy) for ids, px in zip(prompts, pics)])
        assert got == want
        assert engine.scheduler.preemptions > 0
        assert engine.encoder_cache.encoded == 3
    finally:
        engine.stop()


def test_a_grammar_the_tokenizer_cannot_carry_is_a_400(http):
    """The tiny model's word-level tokenizer has no decoder llguidance reads: a response format
    is refused with a 400 naming it, not a 500."""
    client, _, _, _ = http
    r = chat(client, [{"type": "text", "text": "w40"}], response_format={"type": "json_object"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format" and "cannot carry a grammar" in r.json()["error"]["message"]
