"""Stage `teacher`: running SGLang-protocol teacher servers, described in `endpoint.json`.

    with Teacher(cfg, run_dir).serve() as urls:      # None when no server is needed
        ...                                          # train against `urls`

Not cached: a server is a process, not a file. It is needed when the teacher's log-probs
come over HTTP (`algorithm.teacher_source == "server"`, slime's opd_type=sglang, whatever
the backend); `teacher.backend` builtin / sglang starts `teacher.num_replicas` servers of the
downloaded teacher, external only checks `teacher.url`. Whatever was started is stopped when
`serve` exits, also on failure (`ServerProcess.stop` kills the whole process group).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        """Start (or check) the teacher servers and record them in `endpoint.json`."""
        teacher = self.cfg.teacher
        # A damaged weight file is named here, not in a server log after a failed start.
        verify_inputs(self.run_dir.root, [self.run_dir.teacher_hf], self.name)
        fleet = start_servers(
            "teacher",
            teacher,
            self.run_dir.teacher_hf,
            self.run_dir.teacher_log,
            count=teacher.num_replicas,
        )
        write_json(
            self.run_dir.endpoint,
            {"urls": fleet.urls, "backend": teacher.backend, "model_info": fleet.model_info},
        )
        return fleet

    @contextmanager
    def serve(self, skip: bool = False) -> Iterator[list[str] | None]:
        """The teacher URLs while the block runs (None if `skip` or no server is needed)."""
        if skip or not self.needed:
            yield None
            return
        with self.start() as fleet:
            yield fleet.urls
