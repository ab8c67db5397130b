# Container image without a Docker engine: buildah builds the Dockerfile on a Debian bookworm base
# made here with debootstrap, installing only from a local wheelhouse. Included at the end of the
# Makefile (which defines VENV, PY, TORCH_SPEC, TORCH_PIP_ARGS and the venv target; included
# first, its first target would become the default goal); not part of `make test`.
# Needs root and: apt-get install -y buildah podman debootstrap. See docs/DEPLOY.md.
#
#   make image         base image (once), wheelhouse, then `buildah bud` of the cpu target
#   make image-smoke   readiness, one prediction and SIGTERM inside the image (deploy/smoke.py)

IMAGE ?= localhost/mcserve:latest
IMAGE_TARGET ?= cpu
IMAGE_BASE ?= localhost/mcserve-base:bookworm
DEBIAN_SUITE ?= bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
BUILDAH ?= buildah
# chroot isolation: no user namespaces or OCI runtime needed (podman run does not work here)
BUILDAH_ISOLATION ?= chroot
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

IMAGE_BUILD_DIR := build
WHEELHOUSE := $(IMAGE_BUILD_DIR)/wheels
BASE_ROOTFS := $(CURDIR)/$(IMAGE_BUILD_DIR)/base-rootfs

.PHONY: image image-base image-smoke wheelhouse lock

# Debian's own python3 (3.11 in bookworm) with venv; no compilers, no pip outside the venv. The
# rootfs leaves apt's caches and lists and the host's resolv.conf and hostname behind; of the
# documentation only the copyright files stay.
image-base:
	@if $(BUILDAH) inspect --type image $(IMAGE_BASE) >/dev/null 2>&1; then \
	  echo "image-base: $(IMAGE_BASE) already present (buildah rmi it to rebuild)"; \
	else \
	  set -e; rm -rf $(BASE_ROOTFS); \
	  debootstrap --variant=minbase --include=python3,python3-venv \
	    $(DEBIAN_SUITE) $(BASE_ROOTFS) $(DEBIAN_MIRROR); \
	  cd $(BASE_ROOTFS); \
	  rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
	    var/log/* etc/resolv.conf etc/hostname usr/share/man/* usr/share/info/* \
	    usr/share/locale/*; \
	  find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete; \
	  find usr/share/doc -mindepth 1 -type d -empty -delete; \
	  tar --numeric-owner -c . | podman import \
	    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
	    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - $(IMAGE_BASE); \
	  cd - >/dev/null; rm -rf $(BASE_ROOTFS); \
	fi

# torch (CPU build) first, then exactly what requirements.lock pins (every other runtime
# dependency and the build backend), all as wheels for this interpreter (CPython 3.11, the same
# as the image's).
$(IMAGE_BUILD_DIR)/wheels.stamp: requirements.lock | venv
	mkdir -p $(WHEELHOUSE)
	$(PY) -m pip download --quiet --only-binary=:all: --no-deps --dest $(WHEELHOUSE) \
	  $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip download --quiet --only-binary=:all: --no-deps --dest $(WHEELHOUSE) \
	  --requirement requirements.lock
	touch $@

wheelhouse: $(IMAGE_BUILD_DIR)/wheels.stamp

# requirements.lock from the environment `make venv` made (after a dependency changed).
lock: | venv
	$(PY) deploy/lock.py > requirements.lock

# --format docker keeps HEALTHCHECK (OCI image config has no field for it); --layers reuses the
# venv layers when only code or bundles changed (`buildah rmi --prune` drops superseded ones).
image: image-base wheelhouse
	@start=$$(date +%s); \
	$(BUILDAH) bud --isolation $(BUILDAH_ISOLATION) --format docker --layers --pull=never \
	  --target $(IMAGE_TARGET) \
	  --build-arg BASE_IMAGE=$(IMAGE_BASE) \
	  --build-context wheelhouse=$(WHEELHOUSE) \
	  --build-arg PIP_EXTRA_ARGS="--no-index --find-links /wheels" \
	  --tag $(IMAGE) . \
	&& echo "image: built $(IMAGE) in $$(( $$(date +%s) - start )) s;" \
	  "size $$($(BUILDAH) images --format '{{.Size}}' $(IMAGE))"

image-smoke:
	@$(BUILDAH) inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' $(IMAGE) \
	  | grep -q healthz || { echo "image-smoke: no HEALTHCHECK in $(IMAGE)"; exit 1; }
	@ctr=$$($(BUILDAH) from --pull=never $(IMAGE)); \
	trap '$(BUILDAH) rm '"$$ctr"' >/dev/null' EXIT; \
	$(BUILDAH) run --isolation $(BUILDAH_ISOLATION) \
	  --volume $(CURDIR)/deploy/smoke.py:/tmp/smoke.py:ro $$ctr -- python /tmp/smoke.py
