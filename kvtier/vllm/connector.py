"""``KVTierConnector``: kvtier behind vLLM's KV-transfer interface (KVConnectorBase_V1).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"namespace": "vllm", "chunk_size": 256}}'

vLLM builds the connector once per process: in the engine core with the scheduler role and in
every worker with the worker role. This class only routes each call to the half it belongs to
(kvtier.vllm.scheduler, kvtier.vllm.worker); settings are in kvtier.vllm.settings.

``kv_load_failure_policy`` should be ``"recompute"``: a chunk that cannot be loaded (daemon
down, lease lost, checksum mismatch) is then recomputed by vLLM. With vLLM's default
(``"fail"``) such a request fails instead, which kvtier never wants; the connector says so
in the log at start.
"""
from __future__ import annotations

import logging
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)

from .meta import StepMeta
from .scheduler import SchedulerHalf
from .settings import ConnectorSettings
from .worker import WorkerHalf

log = logging.getLogger("kvtier.vllm")

try:  # vLLM >= 0.32: hit tokens by source for vllm:prompt_tokens_cached_by_source
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover - older vLLM: no per-source metrics
    CacheHitSource = None


class KVTierConnector(KVConnectorBase_V1):
    """kvtier as vLLM's KV connector: a scheduler half and a worker half, chosen by role."""

    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.settings = ConnectorSettings.from_extra(getattr(ktc, "kv_connector_extra_config", None))
        self.scheduler: SchedulerHalf | None = None
        self.worker: WorkerHalf | None = None
        if role == KVConnectorRole.SCHEDULER:
            policy = getattr(ktc, "kv_load_failure_policy", "recompute")
            if policy != "recompute":
                log.warning("kvtier: kv_load_failure_policy is %r: a chunk kvtier cannot load fails "
                            "its request; set \"kv_load_failure_policy\": \"recompute\"", policy)
            self.scheduler = SchedulerHalf(vllm_config, kv_cache_config, self.settings)
        else:
            self.worker = WorkerHalf(vllm_config, kv_cache_config, self.settings)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a store that does not happen is a future miss

    # ---- worker role ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self):
        return self.worker.handshake() if self.worker is not None else None

    def handle_preemptions(self, kv_connector_metadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, StepMeta):
            self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, StepMeta):
            self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the step (sync) or before the request runs (async)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # stores copy whole blocks after the step (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if isinstance(meta, StepMeta):
            self.worker.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        meta = self._connector_metadata
        return self.worker.get_finished(finished_req_ids, idle=isinstance(meta, StepMeta) and meta.idle)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors() if self.worker is not None else set()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()

    # ---- scheduler role -------------------------------------------------------------------

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        self.set_xfer_handshake_metadata_pp_aware({(0, tp): m for tp, m in metadata.items()})

    def set_xfer_handshake_metadata_pp_aware(self, metadata: dict[tuple[int, int], Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.set_layouts(metadata)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request, num_external_tokens: int):
        hits = self.scheduler.hit_sources(request, num_external_tokens)
        if CacheHitSource is None:
            return hits
        return {CacheHitSource(k): v for k, v in hits.items()}

    def build_connector_meta(self, scheduler_output) -> StepMeta:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None  # any layout: blocks are copied whole through strides
