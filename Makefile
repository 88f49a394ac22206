# ME-Net for QGIS.  `make test` and `make run` install whatever is missing first
# (Debian packages as root, then a virtual environment at .venv).
SHELL := /bin/bash
# VENV may be given on the command line or in the environment (the CI chroot has its own, outside the checkout).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON_VERSION := $(shell /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
SITE := $(abspath $(VENV))/lib/python$(PYTHON_VERSION)/site-packages
APT_PACKAGES := qgis python3-qgis qgis-providers python3-rasterio python3-gdal python3-venv python3-sklearn
APT_PACKAGES += xvfb
# torch/torchvision apart: the Debian 13 CI chroot takes Debian's own python3-torch instead.
PIP_TORCH := torch==2.14.1 torchvision==0.29.1
# One line per feature, so each can be added or dropped without touching the others.
PIP_PACKAGES := pytest pytest-qgis
PIP_PACKAGES += onnxruntime==1.32.0 openvino==2026.4.1 onnx==1.23.2
# batch: Dask distributed (workers, retries), pystac (STAC catalogs), tqdm (progress bars)
PIP_PACKAGES += "dask[distributed]==2026.8.0" pystac==1.15.2 tqdm==4.70.1
# map from STAC (stac-map, Map mangroves from STAC): pystac-client searches STAC APIs (works with pystac 1.15.2)
PIP_PACKAGES += pystac-client==0.9.1
# docs: the documentation site (make docs)
PIP_PACKAGES += mkdocs==1.6.1
# pip install . (pyproject.toml; tests/test_distributed.py builds it without build isolation, offline): its build back-end
PIP_PACKAGES += setuptools==84.2.1
# fault tests: seeded, time-bounded fuzzing of the engine protocol and the model-record readers
PIP_PACKAGES += hypothesis==6.170.27
VERSION := $(shell sed -n 's/^version=//p' metadata.txt)
# Debian's /usr/bin/qgis_process wrapper passes --noversioncheck, which 3.22 rejects: call the binary.
QGIS_PROCESS := /usr/bin/qgis_process.bin
export QT_QPA_PLATFORM := offscreen
export QGIS_PLUGINPATH := $(CURDIR)/build/plugins
export XDG_DATA_HOME := $(CURDIR)/build/qgis-profile
export XDG_RUNTIME_DIR := $(CURDIR)/build/runtime
export PYTHONPATH := $(SITE)

.PHONY: setup plugin test test-fast test-trixie test-sid run package bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@# GDAL's Python bindings are built against the distribution's numpy: pip must never replace it.
	mkdir -p build && /usr/bin/python3 -c 'import numpy; print("numpy==" + numpy.__version__)' > build/pip-constraints.txt
	$(PY) -m pip install -q -c build/pip-constraints.txt $(PIP_TORCH) $(PIP_PACKAGES)
	touch $@

# The plugin folder QGIS loads: package + metadata.txt + resources (symlinks, always current).
plugin: setup
	@rm -rf build/plugins && mkdir -p build/plugins/menet_qgis $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	@for f in menet_qgis/* metadata.txt resources; do ln -s "$(CURDIR)/$$f" build/plugins/menet_qgis/; done
	@$(QGIS_PROCESS) plugins enable menet_qgis >/dev/null 2>&1 || true  # exits 1 when already enabled
	@$(QGIS_PROCESS) list 2>/dev/null | grep -q "menet:extractmangroves" || { echo "menet provider did not load in qgis_process"; exit 1; }

# TESTS: what pytest runs (default: everything), e.g. make test TESTS="tests/test_processing.py -m 'not user_path'".
TESTS ?= tests
test: plugin
	$(PY) -m pytest -q $(TESTS)

# The unit tests needing nothing beside the checkout, in under a minute (PASSIVE: idle torch threads sleep, not spin).
test-fast: setup
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "unit and not data" tests

# The suite on newer QGIS in a Debian chroot (root; see scripts/ci_chroot.sh). .ci/run runs test-trixie.
test-trixie:
	scripts/ci_chroot.sh trixie

test-sid:
	scripts/ci_chroot.sh sid

run: plugin
	$(PY) scripts/run_demo.py

# dist/: the plugin ZIP without weights (<= 25 MB, asserted), the model as menet_coasts_v2.onnx (runs without
# torch; exported with the venv's torch, checked against the shipped .sha256) and .pt, each with its .sha256, and an
# offline ZIP with the .onnx.  The ZIPs are built by the system python3 (stdlib only).
package: setup
	python3 scripts/package.py --export-python $(abspath $(PY)) $(PACKAGE_ARGS)

# The README's and docs' screenshots, from the desktop GUI test (real QGIS under Xvfb); copied only when it passes.
.PHONY: screenshots
screenshots: plugin
	$(PY) -m pytest -q tests/test_desktop_gui.py tests/test_user_path.py tests/test_desktop_gui_product.py
	mkdir -p docs/screenshots
	cp build/gui/dialog_parameters.png build/gui/dialog_log.png build/gui/main_window_result.png docs/screenshots/
	cp build/user_path/desktop/08_main_window_map.png docs/screenshots/user_path_map.png
	cp build/user_path/desktop/07_extract_log.png docs/screenshots/user_path_extract_log.png
	cp build/gui-product/product_map_clouds_through.png docs/screenshots/product_clouds_map.png

# The documentation site (docs/, mkdocs.yml) into build/site; warnings (a broken link or anchor, a page
# missing from the nav) are errors.
.PHONY: docs
docs: setup
	$(PY) -m mkdocs build --strict

bench: plugin
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

clean:
	rm -rf build dist

# `make -s print-PIP_PACKAGES`: a variable's value, for scripts (the CI chroot reads its package lists here).
print-%:
	@echo $($*)
