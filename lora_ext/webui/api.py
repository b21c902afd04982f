"""REST routes of lora_ext inside the WebUI's FastAPI app (FastAPI 0.94 / pydantic 1 there; plain dicts here, so
pydantic 2 works as well).

Routes (`add_routes(app, st)` with the glue's `GlueState`, called from its app_started callback):
    GET  /lora_ext/status               who handles `<lora:...>`, version, number of files, LoRAs merged right now
    GET  /lora_ext/loras                the catalogue (query: search, sd_version, refresh); no tensor is read (the
                                        header metadata once per file version, kept by the index)
    GET  /lora_ext/loras/{name}         one file in depth: full metadata, parse result, coverage against the loaded
                                        model (404 unknown name, 422 unreadable file)
    POST /lora_ext/refresh              rescan the LoRA folders; returns {"count": n}
    GET  /lora_ext/preview/{name}       the preview image of a listed LoRA (never any other path)
    GET  /sdapi/v1/loras, POST /sdapi/v1/refresh-loras
                                        the built-in Lora extension's routes, in its format, added only when it has
                                        not added them (built-in disabled or absent)

The route functions are thin: the work is done by the module-level functions below (`status`, `list_loras`,
`lora_detail`, `preview_path`, `builtin_list`), which take the glue's `GlueState` and need no FastAPI.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_ext.errors import LoraExtError, LoraFileError, LoraNotFoundError
from lora_ext.formats.metadata import metadata_summary
from lora_ext.formats.network import LoraNetwork
from lora_ext.library.index import LoraEntry, LoraIndex
from lora_ext.patch.patcher import ActiveLora, Patcher
from lora_ext.webui import host
from lora_ext.webui.state import GlueState

log = logging.getLogger(__name__)

PREFIX = "/lora_ext"
BUILTIN_LIST = "/sdapi/v1/loras"
BUILTIN_REFRESH = "/sdapi/v1/refresh-loras"
PREVIEW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif"})


# ------------------------------------------------------------------------------------------------------ records


def lookup_key(index: LoraIndex, entry: LoraEntry) -> str:
    """The text that `index.get` resolves to exactly this file: its name, or, when another file with the same name
    (or an alias equal to it) takes the name, its path relative to its LoRA folder without the extension
    (`sub/dir/name`; `/name` for a file at the top of the folder)."""
    stem = entry.relpath.rsplit(".", 1)[0]
    for key in (entry.name, stem, "/" + stem):
        found = index.get(key)
        if found is not None and found.path == entry.path:
            return key
    return entry.name


def preview_url(key: str, entry: LoraEntry) -> str | None:
    """URL of the entry's preview image on our preview route (`key` from `lookup_key`), or None when it has none."""
    if entry.preview is None:
        return None
    return f"{PREFIX}/preview/{urllib.parse.quote(key)}"


def entry_dict(index: LoraIndex, entry: LoraEntry) -> dict[str, Any]:
    """The list view of one `LoraEntry` (JSON-ready). `key` is what reaches this very file in
    `/lora_ext/loras/{key}`: the name, or `sub/dir/name` for a file whose name another file took.
    Reads nothing but the header metadata, once per file version (the index keeps it)."""
    key = lookup_key(index, entry)
    return {
        "name": entry.name,
        "key": key,
        "alias": entry.alias,
        "path": str(entry.path),
        "relpath": str(entry.relpath),
        "size": entry.size,
        "mtime": entry.mtime_ns / 1e9,
        "sd_version": entry.sd_version,
        "sd_version_source": entry.sd_version_source,
        "sd_version_evidence": entry.sd_version_evidence,
        "algorithm": entry.algorithm,
        "rank": entry.rank,
        "n_modules": entry.n_modules,
        "shorthash": entry.shorthash,
        "preview": preview_url(key, entry),
        "metadata_summary": metadata_summary(entry.metadata),
        "user_metadata": dict(entry.user_metadata),
        "problems": list(entry.problems),
    }


def _matches(entry: LoraEntry, needle: str) -> bool:
    fields = (entry.name, entry.alias, str(entry.relpath), entry.shorthash or "")
    return any(needle in str(f).lower() for f in fields)


def _unique_by_name(st: GlueState, entries: Iterable[LoraEntry]) -> list[LoraEntry]:
    """One entry per name, the one a prompt tag with that name resolves to (A1111 keys its list by name)."""
    out: dict[str, LoraEntry] = {}
    for e in entries:
        if e.name not in out:
            out[e.name] = st.index.get(e.name) or e
    return list(out.values())


# ------------------------------------------------------------------------------------------------------ queries


def status(st: GlueState) -> dict[str, Any]:
    """Who handles the `lora` extra network, and what lora_ext holds right now."""
    from lora_ext import __version__

    handler = host.tag_handler()
    patcher = st.session.patcher
    active = [a.network.name for a in patcher.active] if patcher is not None else []
    return {
        "owner": type(handler).__module__ if handler is not None else None,
        "handles_tags": handler is not None and handler is st.network,
        "previous": type(st.previous).__module__ if st.previous is not None else None,
        "version": __version__,
        "loras": len(st.index.entries()),
        "active": active,
        "backup_mib": round(patcher.backup_bytes / 2**20, 3) if patcher is not None else 0.0,
        "cache_mib": round(st.session.cache.nbytes / 2**20, 3),
    }


def list_loras(st: GlueState, search: str = "", sd_version: str = "", refresh: bool = False) -> list[dict[str, Any]]:
    """The catalogue, optionally rescanned first. `search`: case-insensitive substring of name, alias, relative path
    or short hash; `sd_version`: "SD1" | "SD2" | "SDXL" | "Unknown" (case-insensitive)."""
    entries = st.index.refresh() if refresh else st.index.entries()
    needle = search.strip().lower()
    version = sd_version.strip().lower()
    return [entry_dict(st.index, e) for e in entries
            if (not needle or _matches(e, needle)) and (not version or e.sd_version.lower() == version)]


def lora_detail(st: GlueState, name: str) -> dict[str, Any]:
    """One file in depth: the list fields, full metadata, the parsed file, and `coverage`: what applying it to the
    loaded model would do (`NetworkReport.to_dict()` + `model_arch`; no weight is touched), or None with
    `coverage_reason`. Raises LoraNotFoundError (unknown name, file gone) or LoraExtError (unreadable file)."""
    entry = st.index.get(name)
    if entry is None:
        raise LoraNotFoundError(f"no LoRA named {name!r} in the LoRA folders (GET {PREFIX}/loras lists them; "
                                f"POST {PREFIX}/refresh after adding files)")
    out = entry_dict(st.index, entry)
    out["metadata"] = dict(entry.metadata)
    net = _load(st, entry, name)
    out["file"] = {
        "lora_arch": net.arch.arch,
        "lora_arch_label": net.arch.label,
        "arch_evidence": net.arch.evidence,
        "algorithms": net.algorithms,
        "modules": len(net.modules),
        "unknown_keys": list(net.unknown_keys),
        "bundled_embeddings": sorted(net.bundled_embeddings),
        "nbytes": net.nbytes,
    }
    out["coverage"], out["coverage_reason"] = _coverage(net)
    return out


def _load(st: GlueState, entry: LoraEntry, name: str) -> LoraNetwork:
    path = Path(entry.path)
    try:
        return st.session.load(path, name=name)
    except FileNotFoundError:
        raise LoraNotFoundError(f"the file of LoRA {name!r} is gone ({path}); POST {PREFIX}/refresh") from None
    except LoraExtError:
        raise
    except OSError as err:
        raise LoraFileError(path, f"cannot read the file: {err}") from None


def _coverage(net: LoraNetwork) -> tuple[dict[str, Any] | None, str | None]:
    model = host.loaded_model()
    if model is None:
        return None, "no model is loaded"
    try:
        adapter = host.model_adapter(model)
    except (ValueError, LoraExtError) as err:
        return None, f"the loaded model is not supported: {err}"
    report = Patcher(adapter).check([ActiveLora(net)])
    cov = report.networks[0].to_dict()
    cov["model_arch"] = adapter.arch
    return cov, None


def preview_path(st: GlueState, name: str) -> Path | None:
    """The preview image file of the LoRA `name` (an image next to a listed file), or None."""
    entry = st.index.get(name)
    if entry is None or entry.preview is None:
        return None
    path = Path(entry.preview)
    if path.suffix.lower() not in PREVIEW_SUFFIXES or not path.is_file():
        return None
    return path


def builtin_list(st: GlueState) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/loras` in the built-in's format: [{name, alias, path, metadata}], one per name."""
    return [{"name": e.name, "alias": e.alias, "path": str(e.path), "metadata": dict(e.metadata)}
            for e in _unique_by_name(st, st.index.entries())]


# ------------------------------------------------------------------------------------------------------- routes


def has_route(app: Any, path: str) -> bool:
    return any(getattr(r, "path", None) == path for r in app.routes)


def add_routes(app: Any, st: Any) -> None:
    """Add our routes to the WebUI's FastAPI `app`; the built-in's two routes too when nobody added them."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse

    def get_status() -> dict[str, Any]:
        return status(st)

    def get_loras(search: str = "", sd_version: str = "", refresh: bool = False) -> list[dict[str, Any]]:
        return list_loras(st, search=search, sd_version=sd_version, refresh=refresh)

    def get_lora(name: str) -> dict[str, Any]:
        try:
            return lora_detail(st, name)
        except LoraNotFoundError as err:
            raise HTTPException(status_code=404, detail={"name": name, "error": str(err)}) from None
        except LoraExtError as err:
            raise HTTPException(status_code=422, detail={"name": name, "error": str(err)}) from None

    def post_refresh() -> dict[str, int]:
        return {"count": len(st.index.refresh())}

    def get_preview(name: str) -> Any:
        path = preview_path(st, name)
        if path is None:
            raise HTTPException(status_code=404, detail={"name": name, "error": f"no preview image for {name!r}"})
        return FileResponse(str(path))

    def get_builtin_list() -> list[dict[str, Any]]:
        return builtin_list(st)

    def post_builtin_refresh() -> None:
        st.index.refresh()  # the built-in answers null

    app.add_api_route(f"{PREFIX}/status", get_status, methods=["GET"], response_model=None)
    app.add_api_route(f"{PREFIX}/loras", get_loras, methods=["GET"], response_model=None)
    app.add_api_route(PREFIX + "/loras/{name:path}", get_lora, methods=["GET"], response_model=None)
    app.add_api_route(f"{PREFIX}/refresh", post_refresh, methods=["POST"], response_model=None)
    app.add_api_route(PREFIX + "/preview/{name:path}", get_preview, methods=["GET"], response_model=None)
    if not has_route(app, BUILTIN_LIST):
        app.add_api_route(BUILTIN_LIST, get_builtin_list, methods=["GET"], response_model=None)
        app.add_api_route(BUILTIN_REFRESH, post_builtin_refresh, methods=["POST"], response_model=None)
        log.info("lora_ext: serving %s and %s (the built-in Lora extension is not loaded)", BUILTIN_LIST,
                 BUILTIN_REFRESH)
