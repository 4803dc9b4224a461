"""Stage `teacher`: running SGLang-protocol teacher replicas, described in `endpoint.json`.

    with Teacher(cfg, run_dir).serve() as fleet:     # None when no server is needed
        ...                                          # train against `fleet` (a ServerFleet)

Not cached: a server is a process, not a file. It is needed when the teacher's log-probs
come over HTTP (`algorithm.teacher_source == "server"`, slime's opd_type=sglang, whatever
the backend); `teacher.backend` builtin / sglang starts `teacher.num_replicas` replicas of the
downloaded teacher, each from a Ray actor holding its GPUs (`opd_core.engine.fleet`), behind
sglang-router when there are several; external only checks `teacher.url`. Before anything
starts, the whole run's layout (teacher replicas, training actors, rollout engines) is
checked against the Ray cluster, so a run that cannot fit fails here, not after the teacher
took its GPUs. A replica that dies is relaunched by the fleet (`teacher.max_restarts`).
Whatever was started is stopped when `serve` exits, also on failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opd_core.cluster import ClusterResources, Layout, ray_session
from opd_core.engine.fleet import ServerFleet, start_servers
from opd_core.io import write_json
from opd_core.rundir import verify_inputs
from opd_core.stages.base import Stage


class Teacher(Stage):
    name = "teacher"

    @property
    def needed(self) -> bool:
        return self.cfg.algorithm.teacher_source == "server"

    def start(self) -> ServerFleet:
        """Start (or check) the teacher replicas and record them in `endpoint.json`."""
        cfg = self.cfg
        # A damaged weight file is named here, not in a server log after a failed start.
        verify_inputs(self.run_dir.root, [self.run_dir.teacher_hf], self.name)
        if cfg.teacher.backend == "external":
            fleet = start_servers("teacher", cfg, self.run_dir.teacher_hf, self.run_dir.teacher_log)
        else:
            layout = Layout.from_config(cfg)
            with ray_session(cfg, layout):  # the fleet holds its own session from here on
                layout.check(ClusterResources.from_ray())
                fleet = start_servers(
                    "teacher", cfg, self.run_dir.teacher_hf, self.run_dir.teacher_log
                )
        write_json(
            self.run_dir.endpoint,
            {
                "urls": fleet.urls,
                "url": fleet.url,  # the router's when there are several replicas
                "backend": fleet.backend,
                "model_info": fleet.model_info,
                "placement": [row.to_dict() for row in fleet.placement],
            },
        )
        return fleet

    @contextmanager
    def serve(self, skip: bool = False) -> Iterator[ServerFleet | None]:
        """The running teacher while the block runs (None if `skip` or no server is needed)."""
        if skip or not self.needed:
            yield None
            return
        with self.start() as fleet:
            yield fleet
