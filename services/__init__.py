"""The services (installed as ``cepo_services``): rollout, teacher, verifier and learner, each a folder that can be
read and deployed on its own, plus ``common``, the small library they share. A service imports only
``cepo_proto``, ``cepo_services.common`` and its own folder — never the control plane (``cepo``) or another
service (``tests/test_layers.py`` walks the imports)."""
