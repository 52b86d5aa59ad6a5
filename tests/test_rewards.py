"""Tests for rewards.py: OCR with the real offline engine, CLIP-family rewards on tiny from-config CLIP
folders loaded through the real code path, the HTTP remote reward against a real local server, and the
weighted multi-reward. CPU only, about 10 s. Run from the repository root: python -m pytest."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

import rewards
from toy_tasks import edit_distance

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------
# OCR: closed form


def test_edit_distance_closed_form():
    cases = [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0),
             ("abc", "acb", 2), ("hello", "hallo", 1), ("intention", "execution", 5)]
    for a, b, distance in cases:
        assert edit_distance(a, b) == distance
        assert edit_distance(b, a) == distance


def test_ocr_target_first_quoted_pair():
    assert rewards.ocr_target('a sign that says "Hello World" in red') == "helloworld"
    assert rewards.ocr_target('a "cat" and a "dog"') == "cat"
    assert rewards.ocr_target("no quotes here") is None
    assert rewards.ocr_target('one "unpaired quote') is None
    assert rewards.ocr_target('empty "" quotes') is None


def test_ocr_score_partial_credit():
    prompt = 'a shop sign reading "Hello"'
    assert rewards.ocr_score("hello", prompt) == 1.0
    assert rewards.ocr_score("HeL lo", prompt) == 1.0  # case and spaces ignored
    assert rewards.ocr_score("the sign says hello!", prompt) == 1.0  # substring
    assert rewards.ocr_score("hella", prompt) == pytest.approx(1 - 1 / 5)
    assert rewards.ocr_score("helo", prompt) == pytest.approx(1 - 1 / 5)
    assert rewards.ocr_score("hxllx", prompt) == pytest.approx(1 - 2 / 5)
    assert rewards.ocr_score("", prompt) == 0.0
    assert rewards.ocr_score("abcdefghijklmnop", prompt) == 0.0  # distance clipped to len(target)
    assert rewards.ocr_score("hlo world", 'say "Hello World"') == pytest.approx(1 - 2 / 10)
    assert rewards.ocr_score("hello", "no target") == 0.0
    assert rewards.ocr_accuracy(["hello", "hella", "zzzzz"], [prompt] * 3) == pytest.approx((1 + 0.8 + 0) / 3)


# ---------------------------------------------------------------------------------------------------
# OCR: the real engine on rendered 512 px images

WORDS = ["hello world", "flow matching", "OPEN SESAME", "Cafe 2024", "distill",
         "teacher", "PIZZA", "quick fox", "banana", "sunset"]


def render(text: str, size: int = 512, font_size: int = 56, variant: str = "clean", seed: int = 0) -> Image.Image:
    """Black text (lines split by \\n) centred on white, optionally blurred or with Gaussian pixel noise."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)  # Pillow's bundled scalable font: no system fonts needed
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - right + left) // 2, (size - bottom + top) // 2), text, fill="black", font=font)
    if variant == "blur":
        return image.filter(ImageFilter.GaussianBlur(1.5))
    if variant == "noise":
        noise = np.random.default_rng(seed).normal(0, 25, (size, size, 3))
        return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    return image


@pytest.fixture(scope="module")
def ocr_reward():
    return rewards.make_reward("ocr")


def test_ocr_reads_rendered_text(ocr_reward):
    variants = ["clean", "blur", "noise"]
    images = [render(w, font_size=44 + 4 * i, variant=variants[i % 3], seed=i) for i, w in enumerate(WORDS)]
    prompts = [f'a poster with the words "{w}" on it' for w in WORDS]
    scores = ocr_reward(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (10,)
    assert (scores == 1).sum() >= 9, scores


def test_ocr_pure_noise_scores_zero(ocr_reward):
    noise = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    assert ocr_reward(noise, ['"hello"', '"banana"']).tolist() == [0.0, 0.0]


def test_ocr_prompt_without_quotes_warns_and_scores_zero(ocr_reward):
    images = [render("banana"), render("banana")]
    with pytest.warns(UserWarning, match="1 of 2 prompts have no quoted target"):
        scores = ocr_reward(images, ["a banana", 'the word "banana"'])
    assert scores.tolist() == [0.0, 1.0]


def test_ocr_tensor_input_matches_pil(ocr_reward):
    images = [render("teacher"), render("student", variant="blur")]
    tensor = torch.stack([torch.tensor(np.asarray(i)).permute(2, 0, 1) for i in images]).float() / 255
    prompts = ['"teacher"', '"studnt"']
    assert torch.equal(ocr_reward(tensor, prompts), ocr_reward(images, prompts))
    assert ocr_reward(tensor, prompts).tolist() == pytest.approx([1.0, 1 - 1 / 6])


def test_batched_reading_matches_engine_per_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = rewards.load_ocr_engine()
    assert os.listdir(tmp_path) == [] and Path.cwd() == tmp_path  # the engine's ./cache/ went elsewhere
    cases = [("flow matching", "clean"), ("PIZZA", "noise"), ("top line\n\nbottom", "clean")]
    images = [np.asarray(render(text, variant=variant)) for text, variant in cases]
    per_image = ["".join(text for _, (text, conf) in engine.ocr(a[:, :, ::-1].copy())[0]) for a in images]
    assert rewards.read_texts(engine, images) == per_image
    assert per_image[0] == "flow matching" and per_image[2].replace(" ", "") == "toplinebottom"


# ---------------------------------------------------------------------------------------------------
# CLIP family: tiny from-config CLIP folders, loaded through the same code path as the real ones


def save_tiny_clip(folder: Path) -> Path:
    """A CLIP folder laid out like openai/clip-vit-large-patch14 (weights, tokenizer, preprocessor config),
    with tiny random weights and a letters-only vocabulary. projection_dim=768 so the aesthetic head fits."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.update({letter: len(vocab), letter + "</w>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(folder)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **tiny),
        vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    preprocessor = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                    "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 32,
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


@pytest.fixture(scope="module")
def batch():
    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    return images, ["a red cube", "two cats", "a sign", "blue sky at dusk"]


def hand_scores(folder, images, prompts):
    """logit_scale.exp() * cosine of the model's own image and text features, and its logits_per_image."""
    from transformers import CLIPModel, CLIPProcessor

    processor, model = CLIPProcessor.from_pretrained(folder), CLIPModel.from_pretrained(folder).eval()
    pil = [Image.fromarray(a) for a in rewards.to_uint8(images)]
    inputs = processor(text=prompts, images=pil, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        cosine = torch.cosine_similarity(image, text.pooler_output, dim=-1)
        logits = model(**inputs).logits_per_image
    return model.logit_scale.exp() * cosine, logits.diagonal(), image


def test_pickscore_and_clipscore_match_hand_computation(tiny_clip, batch):
    images, prompts = batch
    expected, logits_diagonal, _ = hand_scores(tiny_clip, images, prompts)
    pickscore = rewards.make_reward("pickscore", processor=tiny_clip, model=tiny_clip, device="cpu")(images, prompts)
    pick_reward = rewards.make_reward("pickscore_reward", processor=tiny_clip, model=tiny_clip)(images, prompts)
    clipscore = rewards.make_reward("clipscore", model=tiny_clip)(images, prompts)
    assert pickscore.dtype == torch.float32 and pickscore.shape == (4,)
    assert torch.allclose(pickscore, expected, atol=1e-5)
    assert torch.allclose(pick_reward, expected / 26, atol=1e-6)
    assert torch.allclose(clipscore, logits_diagonal / 30, atol=1e-6)
    assert pickscore.std() > 1e-3  # the pairs really score differently


def test_clip_scores_follow_image_prompt_pairing(tiny_clip, batch):
    images, prompts = batch
    reward = rewards.make_reward("pickscore", processor=tiny_clip, model=tiny_clip)
    scores = reward(images, prompts)
    assert torch.equal(reward(images, prompts), scores)  # deterministic
    order = [2, 0, 3, 1]
    assert torch.allclose(reward(images[order], [prompts[i] for i in order]), scores[order], atol=1e-5)
    mispaired = reward(images, prompts[1:] + prompts[:1])
    assert not torch.allclose(mispaired, scores, atol=1e-3)
    pil = [Image.fromarray(a) for a in rewards.to_uint8(images)]
    assert torch.allclose(reward(pil, prompts), scores, atol=1e-6)


def test_aesthetic_is_head_on_normalised_clip_embedding(tiny_clip, batch, tmp_path):
    from safetensors.torch import save_file

    images, prompts = batch
    torch.manual_seed(2)
    head = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    state = {f"layers.{key}": value for key, value in head.state_dict().items()}  # the LAION .pth key style
    torch.save(state, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    _, _, image_features = hand_scores(tiny_clip, images, prompts)
    with torch.no_grad():
        expected = head.eval()(torch.nn.functional.normalize(image_features, dim=-1)).squeeze(1)
    for name in ["head.pth", "head.safetensors"]:
        scores = rewards.make_reward("aesthetic", clip=tiny_clip, head=str(tmp_path / name))(images, prompts)
        assert scores.shape == (4,) and torch.allclose(scores, expected, atol=1e-5)


def test_model_folders_from_environment(tiny_clip, batch, monkeypatch):
    monkeypatch.setenv("FLOWOPD_CLIP_L", tiny_clip)
    images, prompts = batch
    expected = rewards.make_reward("clipscore", model=tiny_clip)(images, prompts)
    assert torch.equal(rewards.make_reward("clipscore")(images, prompts), expected)


def test_missing_model_gives_one_line_error(tiny_clip, monkeypatch):
    monkeypatch.delenv("FLOWOPD_PICKSCORE_MODEL", raising=False)
    monkeypatch.delenv("FLOWOPD_AESTHETIC_HEAD", raising=False)
    with pytest.raises(FileNotFoundError) as error:
        rewards.make_reward("pickscore", processor=tiny_clip, model="/nonexistent/pickscore")
    assert str(error.value) == ("PickScore model folder not found: /nonexistent/pickscore (expected a local copy of "
                                "yuvalkirstain/PickScore_v1; set FLOWOPD_PICKSCORE_MODEL)")
    with pytest.raises(FileNotFoundError, match=r"PickScore model folder not found: \(not set\)"):
        rewards.make_reward("pickscore", processor=tiny_clip)
    with pytest.raises(FileNotFoundError, match="aesthetic head file not found.*FLOWOPD_AESTHETIC_HEAD"):
        rewards.make_reward("aesthetic", clip=tiny_clip)


# ---------------------------------------------------------------------------------------------------
# remote: a real server on 127.0.0.1


def start_server(reward: str) -> tuple[subprocess.Popen, str]:
    """`python rewards.py serve --reward <reward> --port 0`; returns the process and its printed url."""
    process = subprocess.Popen([sys.executable, "rewards.py", "serve", "--reward", reward, "--port", "0"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()  # printed once the socket listens
    assert line.startswith("serving reward"), line
    return process, line.split(" at ")[1].strip()


@pytest.fixture(scope="module")
def server():
    process, url = start_server("brightness")
    yield url
    process.terminate()
    process.wait(10)


def test_remote_scores_equal_local(server):
    images = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    prompts, metadata = ["a", "b", "c"], [{"tag": "x"}, {}, {"n": 1}]
    local = rewards.make_reward("brightness")(images, prompts, metadata)
    remote = rewards.make_reward("remote", url=server, timeout=10, retries=0)(images, prompts, metadata)
    assert remote.dtype == torch.float32 and torch.equal(remote, local)


def post_raw(url: str, body: bytes) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_answers_malformed_requests_with_400(server):
    status, reply = post_raw(server, b"not json")
    assert status == 400 and "malformed request" in reply["error"]
    status, reply = post_raw(server, json.dumps({"images": ["!!"], "prompts": ["a"]}).encode())
    assert status == 400 and "malformed request" in reply["error"]
    good = rewards.encode_request(torch.zeros(2, 3, 8, 8), ["a", "b"], None)
    status, reply = post_raw(server, good.replace(b'"prompts": ["a", "b"]', b'"prompts": ["a"]'))
    assert status == 400 and "'prompts' must be a list of 2 strings" in reply["error"]
    assert post_raw(server, good) == (200, {"scores": [0.0, 0.0]})  # still serving


def test_reward_failure_is_a_500():
    def broken(images, prompts, metadata):
        raise RuntimeError("model exploded")

    status, reply = rewards.answer(broken, "broken", rewards.encode_request(torch.zeros(1, 3, 8, 8), ["a"], None))
    assert status == 500 and "model exploded" in reply["error"]


def test_stopped_server_raises_clear_error_quickly():
    server = rewards.make_server("127.0.0.1", 0)                             # `rewards.py serve`'s, in this process
    server.reward, server.name = rewards.make_reward("brightness"), "brightness"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    reward = rewards.make_reward("remote", url=url, timeout=2, retries=2, backoff=0.1)
    assert reward(torch.ones(1, 3, 8, 8), ["a"]).tolist() == [1.0]
    server.shutdown()
    server.server_close()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"reward server at {url} failed after 3 attempts.*rewards.py serve"):
        reward(torch.ones(1, 3, 8, 8), ["a"])
    assert time.monotonic() - start < 2  # refused at once: only the backoff sleeps (0.1 + 0.2 s)


def test_hung_server_times_out():
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        reward = rewards.make_reward("remote", url=url, timeout=0.5, retries=1, backoff=0.1)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="failed after 2 attempts.*timed out"):
            reward(torch.ones(1, 3, 8, 8), ["a"])
        assert 1.0 <= time.monotonic() - start < 3


# ---------------------------------------------------------------------------------------------------
# registry and weighted sum


def test_weighted_reward_sums_components(tiny_clip, batch):
    images, prompts = batch
    weighted = rewards.make_weighted_reward({"brightness": 2.0, "clipscore": 0.5, "brightness:twice": -1.0},
                                            options={"clipscore": {"model": tiny_clip}})
    total, parts = weighted(images, prompts)
    brightness = rewards.make_reward("brightness")(images, prompts)
    clipscore = rewards.make_reward("clipscore", model=tiny_clip)(images, prompts)
    assert set(parts) == {"brightness", "clipscore", "brightness:twice"}
    assert torch.equal(parts["brightness"], brightness) and torch.equal(parts["clipscore"], clipscore)
    assert total.shape == (4,) and torch.allclose(total, brightness + 0.5 * clipscore, atol=1e-6)
    with pytest.raises(ValueError):
        rewards.make_weighted_reward({"brightness": 1.0}, options={"clipscore": {"model": tiny_clip}})


def test_registry_checks_names_and_batches():
    with pytest.raises(KeyError, match="unknown reward 'ocrr'.*pickscore"):
        rewards.make_reward("ocrr")
    reward = rewards.make_reward("brightness")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.zeros(2, 3, 8, 8), ["a"])
    assert {"ocr", "pickscore", "clipscore", "aesthetic", "remote", "toy_geneval", "toy_ocr",
            "toy_quality"} <= set(rewards.REWARDS)
