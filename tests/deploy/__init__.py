"""Checks of the Kubernetes delivery (deploy/): the Helm chart rendered offline, the bootstrap manifests, the images'
Dockerfiles and skaffold.yaml. No cluster, docker engine or helm binary is needed."""
