"""ComfyUI glue for SD-IPC adapter training: patched model clones, the vision encoder with prompts, the loop.

The maths lives in `sdipc_core` (`lora`, `prompt_tuning`, `training`); this module connects it to
ComfyUI's ModelPatcher, weight adapters, model sampling, progress bar and interrupt button.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

import comfy.clip_vision
import comfy.model_management
import comfy.sd
import comfy.utils
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy.weight_adapter.lora import LoraDiff

from ..sdipc_core import PROMPT_LENGTH, SDIPCError, cached_pseudo_inverse, variation_prompt
from ..sdipc_core.adapter_files import AdapterMetadata, TrainedAdapter, base_model_hash
from ..sdipc_core.lora import (
    DIFFUSION_MODEL_PREFIX,
    LoraWeights,
    check_rank,
    cross_attention_modules,
    init_lora_weights,
    lora_state_dict,
)
from ..sdipc_core.projection import SD1_TEXT_HIDDEN_SIZE
from ..sdipc_core.prompt_tuning import VisionPromptTuning, run_layers_with_prompts
from ..sdipc_core.training import (
    LastGoodParameters,
    combined_loss,
    denoising_loss,
    prompts_for_images,
    sample_batch,
)
from .comfy_clip import start_token_state
from .image_to_prompt import converted_image_embeds

logger = logging.getLogger(__name__)

PENULTIMATE_LAYER = -2
"""The hidden layer ComfyUI's CLIPVisionEncode reports as `penultimate_hidden_states`."""


class GraphWeightCopy:
    """Weight wrapper that makes sure autograd receives a normal tensor instead of an inference tensor.

    ComfyUI runs nodes under `torch.inference_mode()`, so a loaded model's weights are inference
    tensors, which autograd refuses to save for the backward pass. Every layer the gradient flows
    through therefore gets this wrapper (or a LoRA adapter) on the training clone. ComfyUI 0.3.64
    copies a weight before it applies wrappers, so the clone below only runs if that copy was
    skipped. Either way each forward pass copies every weight once, as TrainLoraNode's adapters do.
    """

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone() if weight.is_inference() else weight

    def move_to(self, device) -> int:
        return 0


def cross_attention_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """Return the weight shape of every cross-attention projection of a MODEL, keyed by module name."""
    return {
        name: tuple(module.weight.shape)
        for name, module in model.model.named_modules()
        if name.startswith(DIFFUSION_MODEL_PREFIX) and ".attn2." in name and isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def model_fingerprint(model) -> tuple[str, str]:
    """Return the MODEL's family (ComfyUI's model class, such as "SD15") and `base_model_hash`.

    Weights that a loaded LoRA currently overwrites are hashed from ComfyUI's backup of the
    original, so the hash names the base checkpoint.
    """
    family = type(model.model.model_config).__name__
    weights = {}
    for name, tensor in model.model.state_dict().items():
        if name.startswith(DIFFUSION_MODEL_PREFIX) and name.endswith("attn2.to_k.weight"):
            backup = model.backup.get(name)
            weights[name] = backup.weight if backup is not None else tensor
    return family, base_model_hash(weights)


def check_sd1_model(model) -> dict[str, tuple[int, ...]]:
    """Return the cross-attention weight shapes of an SD 1.x MODEL, raising SDIPCError for other models."""
    shapes = cross_attention_weight_shapes(model)
    key_shapes = {name: shape for name, shape in shapes.items() if name.endswith("attn2.to_k")}
    if not key_shapes:
        raise SDIPCError("The MODEL has no U-Net cross-attention layers (attn2). SD-IPC trains on Stable Diffusion 1.x checkpoints.")
    widths = sorted({shape[1] for shape in key_shapes.values()})
    if widths != [SD1_TEXT_HIDDEN_SIZE]:
        raise SDIPCError(
            f"The MODEL's cross-attention reads {widths}-dimensional prompts, but SD-IPC prompts are "
            f"{SD1_TEXT_HIDDEN_SIZE}-dimensional (Stable Diffusion 1.x). Connect an SD 1.x checkpoint."
        )
    return shapes


def encode_pixels(clip_vision, prompt_tuning: VisionPromptTuning | None, pixel_values: torch.Tensor, checkpointing: bool = False):
    """Return (last hidden state, penultimate hidden state, image embeddings) of a ComfyUI CLIP vision model.

    The layers run with `prompt_tuning`'s tokens after the class token. Each layer is applied
    out of place (ComfyUI's CLIPLayer adds its residuals in place, which autograd cannot differentiate).
    With `checkpointing`, each layer's activations are recomputed in the backward pass instead of stored.
    """
    vision = clip_vision.model.vision_model
    if vision.embeddings.class_embedding is None:
        raise SDIPCError("This CLIP vision model has no class token (a SigLIP model?); SD-IPC needs the OpenAI CLIP ViT-L/14 vision model.")

    hidden_states = vision.pre_layrnorm(vision.embeddings(pixel_values))
    attention = optimized_attention_for_device(hidden_states.device, mask=False, small_input=True)
    layers = [functools.partial(_clip_layer, layer, attention) for layer in vision.encoder.layers]
    if checkpointing:
        layers = [functools.partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False) for layer in layers]
    last, penultimate = run_layers_with_prompts(hidden_states, layers, prompt_tuning, keep_layer=PENULTIMATE_LAYER)
    image_embeds = clip_vision.model.visual_projection(vision.post_layernorm(last[:, 0]))
    return last, penultimate, image_embeds


def _clip_layer(layer, attention, x: torch.Tensor) -> torch.Tensor:
    x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
    return x + layer.mlp(layer.layer_norm2(x))


class PromptTunedClipVision(comfy.clip_vision.ClipVisionModel):
    """A CLIP_VISION whose `encode_image` inserts learned prompt tokens; it shares the wrapped model's weights."""

    def __init__(self, clip_vision, prompt_tuning: VisionPromptTuning, source: str = "The vision prompts"):
        base = clip_vision.base_clip_vision if isinstance(clip_vision, PromptTunedClipVision) else clip_vision
        self.__dict__.update(base.__dict__)
        vision = base.model.vision_model
        prompt_tuning.check_fits(len(vision.encoder.layers), vision.embeddings.position_embedding.weight.shape[1], source)
        self.base_clip_vision = base
        self.prompt_tuning = prompt_tuning.eval().requires_grad_(False)

    def encode_image(self, image, crop=True):
        comfy.model_management.load_model_gpu(self.patcher)
        pixel_values = comfy.clip_vision.clip_preprocess(
            image.to(self.load_device), size=self.image_size, mean=self.image_mean, std=self.image_std, crop=crop
        ).float()
        self.prompt_tuning.to(self.load_device)
        last, penultimate, image_embeds = encode_pixels(self, self.prompt_tuning, pixel_values)

        device = comfy.model_management.intermediate_device()
        outputs = comfy.clip_vision.Output()
        outputs["last_hidden_state"] = last.to(device)
        outputs["image_embeds"] = image_embeds.to(device)
        outputs["penultimate_hidden_states"] = penultimate.to(device)
        outputs["mm_projected"] = None
        return outputs


@dataclass(frozen=True)
class TrainingSettings:
    """Everything the trainer nodes set, in sdipc_core's units."""

    method: str
    steps: int
    learning_rate: float
    rank: int
    alpha: float
    batch_size: int
    seed: int
    targets: tuple[str, ...]
    text_weight: float
    vision_prompt_tokens: int
    vision_prompt_learning_rate: float
    training_dtype: str
    gradient_checkpointing: bool
    scale: float
    tolerance: float
    crop_for_clip_vision: bool = True


@dataclass
class TrainingResult:
    adapter: TrainedAdapter
    losses: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    prompt_tuning: VisionPromptTuning | None = None


@dataclass(frozen=True)
class TrainingData:
    """The encoded training set: everything the loop needs that does not change during training."""

    pixels: torch.Tensor
    """[N, H, W, 3] images, for the vision encoder when its prompts are trained."""
    latents: torch.Tensor
    """[N, 4, H/8, W/8], already scaled by the model's latent format."""
    h_sos: torch.Tensor
    """The text encoder's start-token state, [768]."""
    f_cnvrt: torch.Tensor
    """Converted image embeddings of the untuned vision encoder, [N, 768]."""
    text_conds: torch.Tensor | None
    """One encoded text prompt per image, [N, 77, 768], or None without a text term."""


def targeted_modules(model, settings: TrainingSettings) -> list[str]:
    """Return the cross-attention modules the settings adapt, raising SDIPCError for a non-SD 1.x model or a rank that does not fit."""
    shapes = check_sd1_model(model)
    targeted = cross_attention_modules(shapes, settings.targets)
    for name in targeted:
        check_rank(settings.rank, shapes[name], name)
    return targeted


def encode_training_data(model, clip, clip_vision, projection, vae, pixels: torch.Tensor, text_prompts: list[str], settings: TrainingSettings) -> TrainingData:
    """Encode the images (VAE, CLIP vision and conversion) and the text prompts once, before training."""
    h_sos = start_token_state(clip)
    vision_output = clip_vision.encode_image(pixels, crop=settings.crop_for_clip_vision)
    f_cnvrt = converted_image_embeds(clip, vision_output, projection, settings.scale, "fixed", settings.tolerance)
    text_conds = _encode_text_prompts(clip, prompts_for_images(text_prompts, pixels.shape[0]))
    latents = model.model.process_latent_in(vae.encode(pixels))
    return TrainingData(pixels=pixels, latents=latents, h_sos=h_sos, f_cnvrt=f_cnvrt, text_conds=text_conds)


def train_adapter(model, clip_vision, projection, data: TrainingData, settings: TrainingSettings) -> TrainingResult:
    """Train cross-attention LoRA adapters (and optionally vision prompts) on the encoded images.

    Raises comfy.model_management.InterruptProcessingException when the user interrupts. A
    non-finite loss stops training and rolls back to the last step whose loss was finite.
    """
    targeted = targeted_modules(model, settings)
    family, model_hash = model_fingerprint(model)
    images, height, width = data.pixels.shape[:3]
    logger.info(
        "SD-IPC %s: training %d adapters of rank %d (%s) on %d images of %dx%d",
        settings.method, len(targeted), settings.rank, ", ".join(settings.targets), images, width, height,
    )  # fmt: skip

    with torch.inference_mode(False):
        loop = _TrainingLoop(model, clip_vision, projection, settings, targeted, data)
        losses, stop_reason, steps_kept = loop.run()

    metadata = AdapterMetadata(
        method=settings.method,
        base_model_hash=model_hash,
        model_family=family,
        rank=settings.rank,
        alpha=settings.alpha,
        targets=settings.targets,
        steps=steps_kept,
        vision_prompt_tokens=settings.vision_prompt_tokens,
        extra={} if stop_reason is None else {"stop_reason": stop_reason},
    )
    prompt_state = None if loop.prompt_tuning is None else {key: value.detach().cpu().clone() for key, value in loop.prompt_tuning.state_dict().items()}
    adapter = TrainedAdapter(lora=loop.lora_weights(), metadata=metadata, vision_prompts=prompt_state)
    return TrainingResult(adapter=adapter, losses=losses, stop_reason=stop_reason, prompt_tuning=loop.prompt_tuning)


def model_with_adapter(model, adapter: TrainedAdapter, strength: float = 1.0):
    """Return a clone of MODEL with the adapter applied as ordinary LoRA patches, as LoraLoaderModelOnly does."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_state_dict(adapter.lora), strength, 0)
    return patched


def _encode_text_prompts(clip, prompts: list[str]) -> torch.Tensor | None:
    if not prompts:
        return None
    encoded = {prompt: clip.encode_from_tokens(clip.tokenize(prompt)) for prompt in dict.fromkeys(prompts)}
    return torch.cat([encoded[prompt][:, :PROMPT_LENGTH] for prompt in prompts])


class _TrainingLoop:
    """One training run on a clone of the model; all tensors here are created outside inference mode."""

    def __init__(self, model, clip_vision, projection, settings: TrainingSettings, targeted: list[str], data: TrainingData):
        self.settings = settings
        self.device = comfy.model_management.get_torch_device()
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.dtype = _training_dtype(settings.training_dtype, self.device)

        self.patcher = model.clone()
        if self.dtype != self.patcher.model.get_dtype():
            self.patcher.set_model_compute_dtype(self.dtype)
        self.adapters = self._attach_adapters(targeted)
        to_load = [self.patcher]

        self.prompt_tuning = None
        self.clip_vision = clip_vision
        if settings.vision_prompt_tokens > 0:
            vision = clip_vision.model.vision_model
            self.prompt_tuning = VisionPromptTuning(
                len(vision.encoder.layers), settings.vision_prompt_tokens, vision.embeddings.position_embedding.weight.shape[1], generator=self.generator
            ).to(self.device)
            self.vision_patcher = clip_vision.patcher.clone()
            _wrap_all_weights(self.vision_patcher, skip=set())
            to_load.append(self.vision_patcher)
            self.pixel_values = comfy.clip_vision.clip_preprocess(
                data.pixels.clone().to(self.device), size=clip_vision.image_size, mean=clip_vision.image_mean, std=clip_vision.image_std, crop=settings.crop_for_clip_vision
            ).float()
            # A copy made here, outside inference mode, so that autograd may save it.
            self.W_t_pinv = cached_pseudo_inverse(projection.text_projection, settings.tolerance).clone().to(self.device)

        self.h_sos = data.h_sos.clone().to(self.device)
        self.image_conds = variation_prompt(self.h_sos, data.f_cnvrt.clone().to(self.device))
        self.text_conds = None if data.text_conds is None or settings.text_weight == 0.0 else data.text_conds.clone().to(self.device)
        self.latents = data.latents.clone().to(self.device)

        self.patcher.model.requires_grad_(False)
        comfy.model_management.load_models_gpu(to_load, memory_required=1e20, force_full_load=True)

        parameter_groups = [{"params": [p for a in self.adapters.values() for p in (a.lora_up.weight, a.lora_down.weight)], "lr": settings.learning_rate}]
        if self.prompt_tuning is not None:
            parameter_groups.append({"params": list(self.prompt_tuning.parameters()), "lr": settings.vision_prompt_learning_rate})
        self.optimizer = torch.optim.AdamW(parameter_groups)
        self.last_good = LastGoodParameters(p for group in parameter_groups for p in group["params"])

    def _attach_adapters(self, targeted: list[str]) -> dict[str, LoraDiff]:
        adapters = {}
        for name in targeted:
            weight = self.patcher.get_model_object(name).weight
            initial = init_lora_weights(weight.shape[0], weight.shape[1], self.settings.rank, self.settings.alpha, self.generator)
            adapter = LoraDiff((initial.up, initial.down, initial.alpha, None, None, None)).to(self.device)
            adapter.lora_up.weight.requires_grad_(True)
            adapter.lora_down.weight.requires_grad_(True)
            self.patcher.add_weight_wrapper(name + ".weight", adapter)
            adapters[name] = adapter
        _wrap_all_weights(self.patcher, skip={name + ".weight" for name in targeted})
        return adapters

    def lora_weights(self) -> dict[str, LoraWeights]:
        return {
            name: LoraWeights(up=a.lora_up.weight.detach().cpu().clone(), down=a.lora_down.weight.detach().cpu().clone(), alpha=self.settings.alpha)
            for name, a in self.adapters.items()
        }

    def run(self) -> tuple[list[float], str | None, int]:
        steps = self.settings.steps
        progress = comfy.utils.ProgressBar(steps)
        losses: list[float] = []
        stop_reason = None
        report_every = max(1, steps // 10)

        with self._gradient_checkpointing():
            for step in range(steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                image_loss, text_loss = self._losses()
                loss = combined_loss(image_loss, text_loss, self.settings.text_weight)

                if not torch.isfinite(loss).item():
                    if step == 0:
                        raise SDIPCError(
                            "The training loss is NaN or infinite at the first step, before any update: the model, VAE or "
                            "images give non-finite values. Try training_dtype fp32 and check the inputs."
                        )
                    kept = self.last_good.restore()
                    if kept == 0:
                        raise SDIPCError(
                            f"The training loss became {loss.item()} after the first update, so no trained adapter is left "
                            "to keep. Lower the learning rate or use training_dtype fp32."
                        )
                    stop_reason = f"loss became {loss.item()} at step {step + 1}; kept the adapter after {kept} steps"
                    logger.warning("SD-IPC %s stopped early: the %s. Lower the learning rate or use training_dtype fp32.", self.settings.method, stop_reason)
                    return losses, stop_reason, kept

                self.last_good.record(step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

                losses.append(loss.item())
                progress.update(1)
                if (step + 1) % report_every == 0 or step + 1 == steps:
                    text_part = "" if text_loss is None else f", text term {text_loss.item():.4f}"
                    logger.info("SD-IPC %s step %d/%d: loss %.4f (image term %.4f%s)", self.settings.method, step + 1, steps, losses[-1], image_loss.item(), text_part)

        if self.prompt_tuning is not None:
            self.prompt_tuning.eval()
        return losses, stop_reason, steps

    def _losses(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return this step's image-prompt and text-prompt denoising losses."""
        batch = sample_batch(self.generator, self.latents.shape[0], self.settings.batch_size, self.latents.shape[1:])
        indices = batch.indices.to(self.device)
        model_sampling = self.patcher.model.model_sampling
        sigma = model_sampling.sigma(batch.timesteps.to(self.device))
        noise = batch.noise.to(self.device)
        noisy = model_sampling.noise_scaling(sigma, noise, self.latents[indices])

        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            conds = [self._image_conds(indices)]
            if self.text_conds is not None:
                conds.append(self.text_conds[indices])
            copies = len(conds)
            denoised = self.patcher.model.apply_model(
                noisy.repeat(copies, 1, 1, 1),
                sigma.repeat(copies),
                c_crossattn=torch.cat(conds),
                transformer_options=self.patcher.model_options.get("transformer_options", {}),
            )

        size = noisy.shape[0]
        image_loss = denoising_loss(noisy, denoised[:size], noise, sigma)
        text_loss = denoising_loss(noisy, denoised[size:], noise, sigma) if copies > 1 else None
        return image_loss, text_loss

    def _image_conds(self, indices: torch.Tensor) -> torch.Tensor:
        if self.prompt_tuning is None:
            return self.image_conds[indices]
        self.prompt_tuning.train()
        pixel_values = self.pixel_values[indices]
        _, _, image_embeds = encode_pixels(self.clip_vision, self.prompt_tuning, pixel_values, self.settings.gradient_checkpointing)
        # convert_image_embeds' formula, with the pseudo-inverse computed once before training.
        f_cnvrt = self.settings.scale * torch.nn.functional.normalize(image_embeds.float() @ self.W_t_pinv.T, dim=-1)
        return variation_prompt(self.h_sos, f_cnvrt)

    @contextlib.contextmanager
    def _gradient_checkpointing(self):
        if not self.settings.gradient_checkpointing:
            yield
            return
        from comfy_extras.nodes_train import find_all_highest_child_module_with_forward, patch, unpatch

        modules = find_all_highest_child_module_with_forward(self.patcher.model.diffusion_model)
        for module in modules:
            patch(module)
        try:
            yield
        finally:
            for module in modules:
                unpatch(module)


def _wrap_all_weights(patcher, skip: set[str]) -> None:
    """Give every ComfyUI-cast weight and bias of the patcher's model a GraphWeightCopy wrapper."""
    copy = GraphWeightCopy()
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "comfy_cast_weights"):
            continue
        for parameter in ("weight", "bias"):
            key = f"{name}.{parameter}"
            if getattr(module, parameter, None) is not None and key not in skip:
                patcher.add_weight_wrapper(key, copy)


def _training_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32
