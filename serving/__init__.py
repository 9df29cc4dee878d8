"""Ray Serve application: ``serving.app:build_app`` (FastAPI ingress + FluxGenerator), config in serve_config.yaml."""
