"""WorldStereo on ComfyUI's own Wan2.1 model (``comfy.ldm.wan.model.WanModel``).

This package imports ``comfy`` (``worldstereo_core`` never does):

* :mod:`.host`: the host adapter the shared WorldStereo forward runs on;
* :mod:`.model`: the native ``MODEL`` (a ModelPatcher clone of a core Wan2.1-I2V model with the
  variant's backbone as weight patches, the branches as an additional model and the forward as a
  diffusion-model wrapper), or one loaded from a complete variant file without a base;
* :mod:`.conds`: the per-clip WorldStereo inputs as conditioning ``model_conds``;
* :mod:`.vae`: the core ``VAE`` as the keyframe VAE of ``worldstereo_core.pipelines.vae``;
* :mod:`.conditioning`: one clip's conditioning and keyframe latent, computed as the release does;
* :mod:`.sampling`: the release's schedules and UniPC as ComfyUI ``SIGMAS`` / ``SAMPLER``;
* :mod:`.generator`: the tasks' clip generator on the native MODEL (the multi-trajectory loop's);
* :mod:`.identity`: what a loaded core model is (weights and patches), for a run's resume key;
* :mod:`.nodes`: the native nodes (V3 schema).
"""
