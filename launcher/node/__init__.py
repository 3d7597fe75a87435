"""The node agent's services (one process per node): rank logs, system metrics, hang watchdog."""
