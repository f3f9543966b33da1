"""Image rewards for steering diffusers pipelines: decoded images (and prompts) -> scores.

The protocol is one callable::

    reward(images: Tensor[N, 3, H, W] in [0, 1], prompts: list[str | None] of length N) -> Tensor[N]

``LatentReward`` turns such a reward into the latent reward glass_fast's steering calls on x0-predictions:
it decodes through the VAE under ``max_batch`` rows and hands each row its prompt, with gradients when the
caller asks for them (``ImageGuidance``: reward guidance through the VAE). ``CLIPScoreReward``
adapts a CLIP model (``transformers``) whose weights are already on disk; nothing is downloaded.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

# The image normalisation CLIP models were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageReward(Protocol):
    """reward(images [N, 3, H, W] in [0, 1], prompts list of N str or None) -> Tensor[N]."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str | None]) -> torch.Tensor: ...


def check_scores(scores, rows: int, name: str = "reward") -> torch.Tensor:
    """A reward's output as float32 [rows] (integer scores converted); TypeError / ValueError naming what
    came back otherwise."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must return a Tensor[{rows}], got {type(scores).__name__}")
    if scores.is_complex():
        raise TypeError(f"{name} must return real scores, got a Tensor of {scores.dtype}")
    if scores.shape != (rows,):
        raise ValueError(f"{name} must return a Tensor of shape [{rows}] (one score per image), "
                         f"got shape {list(scores.shape)}")
    return scores.float()


def check_unit_images(images, name: str = "reward", tol: float = 1e-3) -> None:
    """ValueError unless ``images`` is a real Tensor [N, 3, H, W] with values in [0, 1] (within ``tol``): images
    in [-1, 1] or [0, 255] would otherwise be clamped to [0, 1] and scored silently wrong."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} takes float images [N, 3, H, W] in [0, 1], got {got}")
    x = images.detach()
    # NaN passes (a diverged particle's score is NaN, which steering handles), out-of-range values do not.
    if bool(((x < -tol) | (x > 1 + tol)).any()):
        lo, hi = float(x.nan_to_num().min()), float(x.nan_to_num().max())
        raise ValueError(f"{name} takes images with values in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (rescale "
                         f"[-1, 1] images by x / 2 + 0.5, 8-bit ones by x / 255)")


class LatentReward:
    """An image reward evaluated on latent states: decode, rescale to [0, 1], score.

    Args:
        flow: the DiffusersFlow adapter (with a VAE).
        reward: an ``ImageReward``.
        prompts: the P prompt strings, or None (then every row's prompt is None).
        num_prompts: P.
        per_prompt: rows per prompt; row r belongs to prompt r // per_prompt.
        height, width: image size in pixels.
        max_batch: most rows decoded and scored at once (None: all).
    """

    def __init__(self, flow, reward, prompts, num_prompts: int, per_prompt: int, height: int, width: int,
                 max_batch=None):
        if not callable(reward):
            raise TypeError(f"reward must be callable(images, prompts) -> Tensor[N], got {type(reward).__name__}")
        if flow.vae is None:
            raise ValueError("image rewards need the pipeline's VAE to decode x0-predictions; the adapter has none")
        for name, v in (("num_prompts", num_prompts), ("per_prompt", per_prompt)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LatentReward: {name} must be an integer >= 1, got {v!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"LatentReward: max_batch must be an integer >= 1 or None, got {max_batch!r}")
        if prompts is not None and len(prompts) != num_prompts:
            raise ValueError(f"LatentReward: prompts has {len(prompts)} entries but num_prompts={num_prompts}")
        self.flow, self.reward, self.prompts, self.per_prompt = flow, reward, prompts, per_prompt
        self.rows = num_prompts * per_prompt
        self.height, self.width, self.max_batch = height, width, max_batch
        self.calls = 0

    def row_prompts(self, lo: int, hi: int, block: int) -> list:
        if self.prompts is None:
            return [None] * (hi - lo)
        return [self.prompts[r // block] for r in range(lo, hi)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, *state_shape] x0-predictions -> Tensor[N] float32 on x's device.

        N is P * per_prompt, or a multiple m of it with rows repeated m times in place (posterior-value
        draws), where row r belongs to prompt r // (m * per_prompt).
        """
        n = x.shape[0]
        if n % self.rows:
            raise ValueError(f"the reward was built for {self.rows // self.per_prompt} prompt(s) x "
                             f"{self.per_prompt} rows = {self.rows} rows (prompt-major) or a multiple of that, "
                             f"got a batch of {n}")
        block = self.per_prompt * (n // self.rows)
        size = n if self.max_batch is None else self.max_batch
        out = []
        # Under the caller's grad mode: steering scores without gradients, reward guidance differentiates
        # through the VAE and the reward.
        for lo in range(0, n, size):
            hi = min(lo + size, n)
            img = (self.flow.decode(x[lo:hi], self.height, self.width) / 2 + 0.5).clamp(0, 1)
            out.append(check_scores(self.reward(img, self.row_prompts(lo, hi, block)), hi - lo).to(x.device))
        self.calls += 1
        return torch.cat(out)


class ImageGuidance:
    """Reward guidance with an image reward: the denoiser is shifted along the gradient of
    reward(decode(D_t(x))), taken through the VAE and the reward (``glass_fast.RewardGuidance``).

    Args:
        reward: a differentiable ``ImageReward``.
        scale: guidance strength (beta for GLASS, lmbda for ODE / SDE proposals), finite.
        window: (lo, hi) glass_fast times t = 1 - sigma where guidance is on.
        detach: True: gradient at D_t(x) (no backward through the transformer); False: through it
            (one more transformer call per guided stage).

    Example:
        >>> images = sample(pipe, "a red bicycle", guidance=ImageGuidance(clip_reward, scale=20.0))
    """

    def __init__(self, reward, scale: float, window=(0.2, 0.7), detach: bool = True):
        from ..steering import RewardGuidance
        self._check = RewardGuidance(reward, scale, window, detach)   # validates every argument
        self.reward, self.scale, self.window, self.detach = reward, float(scale), self._check.window, bool(detach)

    def __repr__(self) -> str:
        return f"ImageGuidance(scale={self.scale}, window={self.window}, detach={self.detach})"

    def bind(self, latent_reward: LatentReward):
        """The ``RewardGuidance`` of this setting over latent states scored by ``latent_reward``."""
        from ..steering import RewardGuidance
        return RewardGuidance(latent_reward, self.scale, self.window, self.detach)


class CLIPScoreReward:
    """Cosine similarity of CLIP image and text features (a CLIP score, unscaled, in [-1, 1]).

    Args:
        model: a ``transformers`` CLIPModel (any size).
        tokenizer: callable(list[str], padding=True, truncation=True, return_tensors="pt") -> mapping with
            ``input_ids`` (and optionally ``attention_mask``), e.g. a CLIPTokenizer.
        image_size: side of the square CLIP reads (default: the model's vision config): images are resized so
            that their shorter side is image_size and cut to the centre square, as CLIP's image processor does.

    Called as reward(images [N, 3, H, W] in [0, 1], prompts: a list of N strings); images outside [0, 1] (within
    1e-3), a bare string or another number of prompts raise an error rather than being clamped or broadcast.

    Example:
        >>> reward = CLIPScoreReward.from_pretrained("/models/clip-vit-large-patch14", device="cuda")
    """

    def __init__(self, model, tokenizer, *, image_size: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.image_size = image_size or model.config.vision_config.image_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str, *, device="cpu", dtype=torch.float32) -> "CLIPScoreReward":
        """Load a CLIP model and tokenizer from local files only (never downloads).

        Raises:
            ImportError: transformers is not installed.
            FileNotFoundError: the weights are not available locally.
        """
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as exc:
            raise ImportError("CLIPScoreReward needs the transformers package (pip install transformers)") from exc
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True).to(device=device, dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"no CLIP weights found locally at {path!r} (nothing is downloaded): "
                                    f"{exc}") from exc
        return cls(model, tokenizer)

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text features [N, E], each distinct prompt encoded once."""
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            tok = self.tokenizer(todo, padding=True, truncation=True, return_tensors="pt")
            p = self._param()
            kwargs = {k: v.to(p.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():   # cached: constants for every later call
                feats = F.normalize(_features(self.model.get_text_features(**kwargs)).float(), dim=-1)
            self._text_cache.update(zip(todo, feats))
        return torch.stack([self._text_cache[q] for q in prompts])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str | None]) -> torch.Tensor:
        check_unit_images(images, "CLIPScoreReward")
        if not isinstance(prompts, (list, tuple)):
            # A bare string would be read as one prompt per character.
            raise TypeError(f"CLIPScoreReward takes a list of one prompt per image, got {prompts!r}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIPScoreReward takes one prompt per image: {images.shape[0]} images, got "
                             f"{len(prompts)} prompts")
        if any(q is None for q in prompts):
            raise ValueError("CLIPScoreReward needs a prompt string for every image; pass prompt= to steer")
        p = self._param()
        # As CLIP's image processor: the shorter side resized to image_size, then the centre square (squeezing a
        # non-square image to a square would distort what CLIP sees).
        s, (h, w) = self.image_size, images.shape[-2:]
        size = (s, max(s, int(s * w / h))) if h <= w else (max(s, int(s * h / w)), s)
        img = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - s) // 2, (size[1] - s) // 2
        img = img[..., top:top + s, left:left + s]
        mean = torch.tensor(CLIP_MEAN, device=img.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=img.device).view(1, 3, 1, 1)
        # Under the caller's grad mode (differentiable for reward guidance); text features are cached constants.
        feats = self.model.get_image_features(pixel_values=((img - mean) / std).to(p.device, p.dtype))
        im = F.normalize(_features(feats).float(), dim=-1)
        return (im * self.text_features(list(prompts)).to(im.device)).sum(-1).to(images.device)


def _features(out) -> torch.Tensor:
    """Newer transformers return a model output object from get_*_features; older ones a Tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")
