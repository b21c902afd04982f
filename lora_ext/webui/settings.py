"""lora_ext's settings in the WebUI ("LoRA (lora_ext)"), and the built-in Lora's settings our behaviour follows when
the built-in is not loaded to register them. Reading a setting: `host.opt`."""

from __future__ import annotations

from collections.abc import Callable

from lora_ext import families

SECTION = ("lora_ext", "LoRA (lora_ext)")
OWN = "lora_ext_handle_lora_tags"
CACHE_MB = "lora_ext_cache_mb"
SCHEDULE_MODE = "lora_ext_schedule_mode"
PER_IMAGE = "lora_ext_per_image_loras"
NEGATIVE = "lora_ext_negative_prompt_loras"


def register(names: Callable[[], list[str]], refresh: Callable[[], None], on_owner_change: Callable[[], None],
             on_cache_change: Callable[[], None]) -> None:
    """Add the settings; `names`/`refresh` feed the "Add network to prompt" dropdown, the two callbacks run when the
    tag-ownership and cache-size settings change."""
    import gradio as gr
    from modules import shared

    templates = shared.options_templates
    ours = {
        OWN: shared.OptionInfo(True, "lora_ext handles <lora:...> and <lyco:...> prompt tags").info(
            "off: the built-in Lora extension handles them again (takes effect at once)"),
        "lora_ext_warn_gradio": shared.OptionInfo(True, "Show LoRA problems (not found, unmatched keys, wrong model) "
                                                        "as a popup"),
        "lora_ext_warn_console": shared.OptionInfo(True, "Print LoRA problems in the console"),
        CACHE_MB: shared.OptionInfo(2048, "Parsed LoRA files kept in memory (MiB)", gr.Number, {"precision": 0}),
        "lora_ext_keep_backups": shared.OptionInfo(True, "Keep backups of restored layers for fast switching").info(
            "costs the memory of the layers your LoRAs touch; off: freed after every generation"),
        PER_IMAGE: shared.OptionInfo(True, "Each image of a batch gets the LoRAs of its own prompt").info(
            "wildcards, prompts from file, X/Y/Z over LoRAs; off: every image gets the first prompt's LoRAs, as the "
            "built-in does"),
        NEGATIVE: shared.OptionInfo(False, "Apply LoRA tags in the negative prompt to the negative branch only").info(
            "off (default, as the built-in): they stay in the negative prompt as plain text; on: taken out of it and "
            "applied to the unconditional UNet rows and the negative prompt's encoding"),
        SCHEDULE_MODE: shared.OptionInfo("auto", "LoRA weights that change during sampling (start=/stop=, "
                                                 "weight@step schedules)", gr.Radio,
                                         {"choices": ["auto", "merge", "bypass"]}).info(
            "auto: estimated per generation; merge: re-merge the layers at each change; bypass: add the LoRA to the "
            "layers' outputs (no re-merge; some cost at every step)"),
    }
    templates.update(shared.options_section(SECTION, ours))
    builtin = {
        "sd_lora": shared.OptionInfo("None", "Add network to prompt", gr.Dropdown,
                                     lambda: {"choices": ["None", *names()]}, refresh=refresh),
        "lora_preferred_name": shared.OptionInfo("Alias from file", "When adding to prompt, refer to Lora by",
                                                 gr.Radio, {"choices": ["Alias from file", "Filename"]}),
        "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
        "lora_bundled_ti_to_infotext": shared.OptionInfo(True, "Add Lora name as TI hashes for bundled Textual "
                                                               "Inversion"),
    }
    missing = {k: v for k, v in builtin.items() if k not in templates}
    if missing:
        templates.update(shared.options_section(("extra_networks", "Extra Networks"), missing))
    shared.opts.onchange(OWN, on_owner_change, call=False)
    shared.opts.onchange(CACHE_MB, on_cache_change, call=False)


def register_cards() -> None:
    """The built-in Lora page's two display settings, for our cards page when the built-in did not register them."""
    import gradio as gr
    from modules import shared

    templates = shared.options_templates
    cards = {
        "lora_show_all": shared.OptionInfo(False, "Always show all networks on the Lora page").info(
            "otherwise, those detected as for incompatible version of Stable Diffusion will be hidden"),
        "lora_hide_unknown_for_versions": shared.OptionInfo([], "Hide networks of unknown versions for model versions",
                                                            gr.CheckboxGroup, {"choices": list(families.SD_VERSIONS)}),
    }
    missing = {k: v for k, v in cards.items() if k not in templates}
    if missing:
        templates.update(shared.options_section(("extra_networks", "Extra Networks"), missing))
