"""The team stack: infra/compose.yaml runs it in Docker; team.py starts the same topology
natively (`xbl team up`), reading it from compose.yaml through compose.py."""
