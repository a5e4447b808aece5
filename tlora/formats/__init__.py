"""Other tools' files, one module each; each owns its key names and its settings mapping, and asks the family
recipe (tlora.families) for its layers' names and groupings:

- `authors_sdxl`, `authors_flux`: the authors' checkpoint files and hparams.yml keys (`AUTHORS` by family);
- `kohya`: kohya-style LoRA files (`lora_unet_<original layer>`), as ComfyUI, Forge and diffusers load them;
- `diffusers_lora`: the LoRA file a family pipeline's `save_lora_weights` writes;
- `diffusers_scheduled`: the `diffusers-scheduled` folder (standard LoRA chunks and schedule.json);
- `lycoris`: SimpleTuner / LyCORIS T-LoRA files.
"""

from tlora.formats import authors_flux, authors_sdxl

AUTHORS = {"sdxl": authors_sdxl, "flux": authors_flux}  # family -> the module of its authors' files
