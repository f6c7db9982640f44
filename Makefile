# boneage: one entry point for the Apolo (formerly Neuro) platform and for local work.
#
#   make help                       every target with a one-line description
#   make setup                      build the project image on the platform (once)
#   make download-data              fetch the RSNA data from Kaggle straight onto storage (or: make upload-data)
#   make training                   check the data, then train on a platform GPU; a preempted job resumes by itself
#   make setup-local && make demo   install locally (torch first, then boneage pinned), then the phantom demo
#   make test                       the test suite (installs the test tools first, once per environment)
#
# Every variable below is set with ?= : override it on the command line
# (make training CONFIG=resnet50 TRAINING_PRESET=gpu-large) or in the environment.
# Keep comments on their own line: a trailing comment would leave spaces in the value.

##### COMMANDS #####

# Apolo CLI executable (`neuro` is the same program under its old name).
APOLO ?= apolo
# Python interpreter used by the local targets.
PYTHON ?= python
# pip invocation used by setup-local and by the test-tools install of `test` and `lint`.
PIP ?= $(PYTHON) -m pip
# The boneage CLI used by the local targets.
BONEAGE ?= boneage
# The torch pair setup-local installs first (the pins of pyproject.toml; tests/test_docs.py checks they agree).
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
# Extra pip options of that torch install, e.g. --index-url https://download.pytorch.org/whl/cpu (CPU-only build).
TORCH_PIP_OPTIONS ?=
# pip constraints file (exact versions) of every local install; empty = the newest versions pyproject.toml allows.
CONSTRAINTS ?= requirements-dev.txt

##### PROJECT AND STORAGE #####

# Project name: storage folder, image name, job names and job tag derive from it.
PROJECT ?= boneage
# Project folder on platform storage (relative to your current Apolo project).
PROJECT_STORAGE ?= storage:$(PROJECT)
# Where the project folder is mounted inside jobs.
PROJECT_MOUNT ?= /$(PROJECT)
# Local code folder `upload-code` uploads.
CODE_DIR ?= src
# Local data folder: $(DATA_DIR)/$(IMAGES_SUBDIR) and $(DATA_DIR)/$(LABELS_FILE).
DATA_DIR ?= data
# Local notebooks folder.
NOTEBOOKS_DIR ?= notebooks
# Local results folder (train-local writes runs here, download-results fills it).
RESULTS_DIR ?= results
# Images folder inside the data folder (locally and on storage).
IMAGES_SUBDIR ?= images
# Labels CSV inside the data folder (training layout id,boneage,male or the RSNA test layout).
LABELS_FILE ?= labels.csv
# Storage location of the code.
CODE_STORAGE ?= $(PROJECT_STORAGE)/src
# Storage location of the data (images + labels CSV).
DATA_STORAGE ?= $(PROJECT_STORAGE)/data
# Storage location of the notebooks.
NOTEBOOKS_STORAGE ?= $(PROJECT_STORAGE)/notebooks
# Storage location of training runs (checkpoints, logs, TensorBoard events).
RESULTS_STORAGE ?= $(PROJECT_STORAGE)/results
# Mount point of the code inside jobs (read-only, first on PYTHONPATH).
CODE_MOUNT ?= $(PROJECT_MOUNT)/src
# Mount point of the data inside jobs (read-only).
DATA_MOUNT ?= $(PROJECT_MOUNT)/data
# Mount point of the notebooks inside jobs (read-write).
NOTEBOOKS_MOUNT ?= $(PROJECT_MOUNT)/notebooks
# Mount point of the results inside jobs (read-write for training).
RESULTS_MOUNT ?= $(PROJECT_MOUNT)/results
# Files `make setup` copies to storage to build the image (pyproject.toml needs README.md).
PROJECT_FILES ?= requirements.txt apt.txt setup.cfg pyproject.toml README.md
# Patterns left out when uploading code.
CODE_EXCLUDE ?= --exclude __pycache__ --exclude '*.pyc' --exclude '*.egg-info'

##### IMAGES #####

# Base image `make setup` starts from (Debian with Python >= 3.10, pip and bash; the pinned
# torch wheel from PyPI brings its own CUDA libraries).
BASE_IMAGE ?= python:3.11-slim-bookworm
# The project image `make setup` saves and every job runs.
CUSTOM_ENV ?= image:$(PROJECT):latest
# Image of the filebrowser job.
FILEBROWSER_IMAGE ?= filebrowser/filebrowser:latest
# apolo-flow executable (`make image` builds the Dockerfile on the platform with it).
APOLO_FLOW ?= apolo-flow
# Docker CLI of `make image-local`.
DOCKER ?= docker
# Local tag of `make image-local`.
LOCAL_IMAGE ?= boneage:latest
# Where the image's torch wheels come from (the Dockerfile's TORCH_INDEX_URL; .../whl/cu128 for CUDA).
IMAGE_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

##### JOB NAMES #####

# Name of the temporary job `make setup` installs packages in.
SETUP_JOB ?= setup-$(PROJECT)
# Name of the single-GPU training job.
TRAINING_JOB ?= training-$(PROJECT)
# Name of the job that checks the data on storage before every training job (never restarts).
DATA_CHECK_JOB ?= check-data-$(PROJECT)
# Name of the job `make download-data` fetches the RSNA data from Kaggle in.
DOWNLOAD_JOB ?= download-data-$(PROJECT)
# Name of the multi-GPU (DDP) training job.
TRAINING_DDP_JOB ?= training-ddp-$(PROJECT)
# Name of the Jupyter job.
JUPYTER_JOB ?= jupyter-$(PROJECT)
# Name of the TensorBoard job.
TENSORBOARD_JOB ?= tensorboard-$(PROJECT)
# Name of the File Browser job.
FILEBROWSER_JOB ?= filebrowser-$(PROJECT)
# Name of the Ray head job (make ray-head); other jobs reach it at its internal hostname.
RAY_HEAD_JOB ?= ray-head-$(PROJECT)
# Name prefix of the Ray worker jobs: $(RAY_WORKER_JOB)-1 ... $(RAY_WORKER_JOB)-$(RAY_WORKERS).
RAY_WORKER_JOB ?= ray-worker-$(PROJECT)
# Name of the `boneage predict --engine ray` driver job of make predict-archive.
PREDICT_ARCHIVE_JOB ?= predict-archive-$(PROJECT)
# Tag put on every job; `make ps` and `make kill` act on the jobs carrying it
# (apolo-flow tags its jobs project:<id> too).
JOB_TAG ?= project:$(PROJECT)
# Second tag of the Ray head and workers; `make ray-kill` terminates the jobs carrying it.
RAY_TAG ?= ray-cluster:$(PROJECT)

##### RESOURCES #####

# Preset of the setup job (run `apolo config show` for the presets your cluster offers).
SETUP_PRESET ?= cpu-small
# Preset of the single-GPU training job.
TRAINING_PRESET ?= gpu-small
# Preset of the download job (no GPU needed).
DOWNLOAD_PRESET ?= cpu-small
# Run-time limit of the download job (about 10 GB from Kaggle, unzipped onto storage).
DOWNLOAD_LIFE_SPAN ?= 6h
# Preset of the DDP training job: needs DDP_GPUS GPUs.
DDP_PRESET ?= gpu-large
# GPUs in DDP_PRESET = DDP worker processes.
DDP_GPUS ?= 2
# Preset of the Jupyter job.
JUPYTER_PRESET ?= gpu-small
# Preset of the TensorBoard job.
TENSORBOARD_PRESET ?= cpu-small
# Preset of the File Browser job.
FILEBROWSER_PRESET ?= cpu-small
# Restart policy of training jobs (never | on-failure | always). on-failure restarts a preempted
# or crashed job with the same command, and --resume continues from RUN_DIR/last.pt.
TRAINING_RESTART ?= on-failure
# Run-time limit of training jobs ('0' disables it).
TRAINING_LIFE_SPAN ?= 1d
# Run-time limit of the setup job, a safety net when setup fails half-way.
SETUP_LIFE_SPAN ?= 4h
# Platform HTTP authentication of jupyter/tensorboard/filebrowser: --http-auth or --no-http-auth.
# WARNING: --no-http-auth opens the job's URL (and your data) to anyone who has it.
HTTP_AUTH ?= --http-auth
# Global apolo options for the slow `job save` call of `make setup`.
SAVE_OPTIONS ?= --network-timeout 300
# Preset of the Ray head job (Ray also runs predictor actors on its CPUs).
RAY_PRESET ?= cpu-small
# Preset of each Ray worker job (with a GPU preset, Ray gives each worker's GPUs to the predictor actors).
RAY_WORKER_PRESET ?= gpu-small
# Number of Ray worker jobs `make ray-workers` starts.
RAY_WORKERS ?= 2
# Preset of the predict-archive driver job (it joins the cluster with no CPUs or GPUs of its own:
# it lists the archive and writes the table).
PREDICT_PRESET ?= cpu-small
# Run-time limit of the Ray head, worker and driver jobs ('0' disables it).
RAY_LIFE_SPAN ?= 1d

##### TRAINING #####

# Shipped config name (lite0-gpu, lite2-gpu, lite0-gpu-299, lite2-gpu-299, cpu-small, paper-m46, resnet50,
# inceptionv3, bonenet-s) or a YAML path. Default: lite0-gpu (full-size data, 512 px). Neither GPU config is
# measured yet; lite2-gpu is the larger EfficientNet-Lite2, the -299 configs are for the 299-px shared sample.
CONFIG ?= lite0-gpu
# train.engine of the single-GPU job: gpu fails with a clear error when the job has no usable GPU (never a
# silent CPU run); cpu trains on the CPU on purpose, auto takes the GPU when there is one.
TRAINING_ENGINE ?= gpu
# Run folder name under the results folder; rerunning the same name resumes it.
RUN_NAME ?= $(basename $(notdir $(CONFIG)))
# Run folder name of DDP training.
DDP_RUN_NAME ?= $(RUN_NAME)-ddp
# Extra arguments appended to `boneage train` (section.key=value overrides, --cache-dir DIR, ...).
TRAIN_EXTRA ?=

##### DATA DOWNLOAD (make download-data) #####

# Apolo secret with your Kaggle username (create both secrets once: see docs/platform.md); the download job
# gets them as KAGGLE_USERNAME / KAGGLE_KEY, resolved by the platform: never on a command line or in a log.
KAGGLE_USERNAME_SECRET ?= kaggle-username
# Apolo secret with your Kaggle API key (the job's KAGGLE_KEY).
KAGGLE_KEY_SECRET ?= kaggle-key
# Kaggle client the download job installs when the image has none (the [download] extra, pinned).
KAGGLE_PACKAGE ?= kaggle==2.2.5

##### RAY CLUSTER (make ray-head, ray-workers, predict-archive) #####

# Port of the Ray head (its GCS) that the workers and the driver connect to.
RAY_PORT ?= 6379
# Internal hostname of the Ray head; empty = the "Internal Hostname Named" of `apolo status RAY_HEAD_JOB`.
RAY_HEAD_HOST ?=
# Ray that every Ray job installs at start when the image has none (the [distributed] extra, pinned:
# the head, the workers and the driver must run the same Ray).
RAY_PACKAGE ?= ray[data]==2.60.0
# Apolo secret with the cluster's Ray auth token (make ray-head stores a new random one; every Ray job gets it).
RAY_TOKEN_SECRET ?= ray-token-$(PROJECT)
# Storage folder predict-archive scores (recursively); the head, the workers and the driver all mount it
# read-only at ARCHIVE_MOUNT, so start them with the same ARCHIVE.
ARCHIVE ?= $(DATA_STORAGE)/$(IMAGES_SUBDIR)
# Where the Ray jobs mount ARCHIVE.
ARCHIVE_MOUNT ?= $(PROJECT_MOUNT)/archive
# Checkpoint predict-archive scores with, as a path inside the jobs (every Ray job mounts the results).
PREDICT_CHECKPOINT ?= $(RESULTS_MOUNT)/$(RUN_NAME)/best.pt
# Output folder of predict-archive under the results folder (its table; rerunning resumes it).
PREDICT_OUT ?= predictions
# Extra arguments appended to the driver's `boneage predict` (--table parquet, --no-tta, ...; no single quotes).
PREDICT_EXTRA ?=

##### LOCAL #####

# HTTP port of jupyter-local.
JUPYTER_PORT ?= 8888
# HTTP port of tensorboard-local.
TENSORBOARD_PORT ?= 6006
# Output folder of `make demo`.
DEMO_DIR ?= runs/demo
# Number of synthetic phantoms `make demo` trains on (a further DEMO_N/4, drawn with another seed, are held out).
DEMO_N ?= 320
# Overrides `make demo` passes to `boneage train --config cpu-small`.
DEMO_TRAIN_EXTRA ?= train.epochs=24 preprocess.size=96 data.val_fraction=0.2
# Id of the held-out phantom `make demo` reports on (100000 is the first; its drawn age and sex are used).
DEMO_FEATURED ?= 100000
# Checkpoint whose out-of-distribution refusal make bench-ood measures (false refusals on its held-out split)
OOD_CHECKPOINT ?= runs/cpu-small/best.pt
# Notebook `make notebook-html` executes.
NOTEBOOK ?= notebooks/demo.ipynb
# Output folder of `make notebook-html`.
NOTEBOOK_OUT ?= runs/notebook

# Internal (not meant to be overridden): the two scripts `make setup` runs inside the setup job.
# apt.txt may hold comments; the package itself is installed from a copy because the mount is read-only.
_SETUP_APT = export DEBIAN_FRONTEND=noninteractive \
	&& apt-get -qq update \
	&& grep -v "^ *\#" $(PROJECT_MOUNT)/apt.txt | xargs -r apt-get -qq install -y --no-install-recommends \
	&& apt-get -qq clean && rm -rf /var/lib/apt/lists/*
_SETUP_PIP = python -m pip install --progress-bar=off --no-cache-dir -r $(PROJECT_MOUNT)/requirements.txt \
	&& rm -rf /tmp/boneage-build && mkdir /tmp/boneage-build \
	&& cp -r $(PROJECT_MOUNT)/pyproject.toml $(PROJECT_MOUNT)/README.md $(PROJECT_MOUNT)/setup.cfg $(CODE_MOUNT) /tmp/boneage-build/ \
	&& python -m pip install --progress-bar=off --no-cache-dir --no-deps /tmp/boneage-build \
	&& rm -rf /tmp/boneage-build

# Internal: the one definition of a training job, shared by `training` and `training-ddp`:
# $(call _TRAINING_RUN,JOB NAME,PRESET,RUN FOLDER under RESULTS_MOUNT,extra `boneage train` options).
# Both targets first run _DATA_CHECK_RUN (make check-data): the on-failure policy restarts a failed job with the
# same command, so a missing or invalid dataset is caught in a job that never restarts, before this one starts.
# Everything else (restart policy, life span, tag, volumes and their modes, env, workdir, image, the
# `boneage train` data/config/resume arguments and TRAIN_EXTRA last) is the same for both jobs.
define _TRAINING_RUN
$(APOLO) run \
	--name $(1) \
	--preset $(2) \
	--detach \
	--restart $(TRAINING_RESTART) \
	--life-span $(TRAINING_LIFE_SPAN) \
	--tag $(JOB_TAG) \
	--volume $(CODE_STORAGE):$(CODE_MOUNT):ro \
	--volume $(DATA_STORAGE):$(DATA_MOUNT):ro \
	--volume $(RESULTS_STORAGE):$(RESULTS_MOUNT):rw \
	--env PYTHONPATH=$(CODE_MOUNT) \
	--workdir $(PROJECT_MOUNT) \
	$(CUSTOM_ENV) \
	-- boneage train \
		--config $(CONFIG) \
		--images $(DATA_MOUNT)/$(IMAGES_SUBDIR) \
		--labels $(DATA_MOUNT)/$(LABELS_FILE) \
		--out $(RESULTS_MOUNT)/$(3) \
		--resume \
		$(4) $(TRAIN_EXTRA)
endef

# Internal: `boneage check-data` on the data volume, attached (`apolo run` without --detach streams its log
# and exits with the job's exit code), never restarted, so make stops at a missing or invalid dataset -- and,
# with --gpu, at a GPU the training could not use (no GPU, a driver too old for the image's CUDA build), which
# would otherwise fail the training job over and over under its on-failure policy:
# $(call _DATA_CHECK_RUN,PRESET of the training job,extra `boneage check-data` options).
define _DATA_CHECK_RUN
$(APOLO) run \
	--name $(DATA_CHECK_JOB) \
	--preset $(1) \
	--no-tty \
	--restart never \
	--life-span 1h \
	--tag $(JOB_TAG) \
	--volume $(CODE_STORAGE):$(CODE_MOUNT):ro \
	--volume $(DATA_STORAGE):$(DATA_MOUNT):ro \
	--env PYTHONPATH=$(CODE_MOUNT) \
	--workdir $(PROJECT_MOUNT) \
	$(CUSTOM_ENV) \
	-- boneage check-data \
		--images $(DATA_MOUNT)/$(IMAGES_SUBDIR) \
		--labels $(DATA_MOUNT)/$(LABELS_FILE) \
		$(2)
endef

# Internal: the Ray cluster of `boneage predict --engine ray` as platform jobs, the way Apolo's own guide runs
# one (github.com/neuro-inc/apolo-documentation, use-cases/llms/deepseek-r1-model-deployment.md: a named head
# job `ray start --head --port=6379 --block`, workers `ray start --address=<head>:6379 --block`, where <head>
# is the "Internal Hostname Named" row of `apolo status <head job>`, e.g. ray-head--0e1436ea6a.platform-jobs,
# or `inspect_job(...).internal_hostname_named` in apolo-flow). Jobs reach each other on any port of that
# hostname: no `apolo run` option is needed (--http-port only publishes one HTTP port through the platform's
# ingress); the platform gives every job a headless Service, and its integration tests connect a job to another
# job's undeclared port (github.com/neuro-inc/platform-api, tests/integration/test_kube_orchestrator.py,
# test_job_check_dns_hostname_undeclared_port and test_named_job_check_dns_hostname).
#
# $(call _RAY_RUN,JOB NAME,PRESET,mode of the results volume,extra apolo options,bash script): every Ray job
# runs the project image with the code, data, ARCHIVE and results mounted, never restarts (a dead head must not
# loop; rerunning predict-archive resumes its table), carries the cluster's auth token from the Apolo secret
# RAY_TOKEN_SECRET (other jobs on the cluster's network cannot join or submit work), sends Ray no usage
# statistics, and first installs RAY_PACKAGE when the image has no Ray.
define _RAY_RUN
$(APOLO) run \
	--name $(1) \
	--preset $(2) \
	--detach \
	--restart never \
	--life-span $(RAY_LIFE_SPAN) \
	--tag $(JOB_TAG) \
	$(4) \
	--volume $(CODE_STORAGE):$(CODE_MOUNT):ro \
	--volume $(DATA_STORAGE):$(DATA_MOUNT):ro \
	--volume $(ARCHIVE):$(ARCHIVE_MOUNT):ro \
	--volume $(RESULTS_STORAGE):$(RESULTS_MOUNT):$(3) \
	--env PYTHONPATH=$(CODE_MOUNT) \
	--env RAY_AUTH_MODE=token \
	--env RAY_AUTH_TOKEN=secret:$(RAY_TOKEN_SECRET) \
	--env RAY_USAGE_STATS_ENABLED=0 \
	--workdir $(PROJECT_MOUNT) \
	$(CUSTOM_ENV) \
	-- bash -c 'set -e; python -c "import ray.data" 2>/dev/null || python -m pip install --progress-bar=off --no-cache-dir "$(RAY_PACKAGE)"; $(5)'
endef
# Internal: the job scripts. A worker or the driver first waits (up to 30 minutes) for the head's port, then
# joins the cluster: the driver as a node with no CPUs or GPUs, because Ray runs a driver that connects by
# address (`--ray-address auto` after `ray start`) only on a node of the cluster; the Ray Client alternative
# (ray://HEAD:10001) needs the ray[client] extra and is meant for interactive shells (docs.ray.io, "Ray Client").
_RAY_WAIT = for i in $$(seq 360); do (exec 3<>"/dev/tcp/$${RAY_HEAD_ADDRESS/://}") 2>/dev/null && break; sleep 5; done
_RAY_HEAD_SCRIPT = ray start --head --port=$(RAY_PORT) --dashboard-host=0.0.0.0 --block
_RAY_WORKER_SCRIPT = $(_RAY_WAIT); ray start --address="$$RAY_HEAD_ADDRESS" --block
_RAY_DRIVER_SCRIPT = $(_RAY_WAIT); ray start --address="$$RAY_HEAD_ADDRESS" --num-cpus=0 --num-gpus=0; rc=0; \
	boneage predict $(ARCHIVE_MOUNT) --recursive --checkpoint $(PREDICT_CHECKPOINT) --engine ray --ray-address auto \
	--reports none --out $(RESULTS_MOUNT)/$(PREDICT_OUT) $(PREDICT_EXTRA) || rc=$$?; ray stop || true; exit $$rc
# Internal: prints HOST:PORT of the head: RAY_HEAD_HOST, else the head job's "Internal Hostname Named" (`apolo
# status` piped prints 2048 columns wide, so nothing is cropped); fails unless the head job is pending or running.
_RAY_HEAD_LOOKUP = if [ -n "$(RAY_HEAD_HOST)" ]; then echo "$(RAY_HEAD_HOST):$(RAY_PORT)"; exit 0; fi; \
	status="$$($(APOLO) status $(RAY_HEAD_JOB))" || exit 1; \
	state="$$(echo "$$status" | awk '$$1 == "Status" { print $$2; exit }')"; \
	host="$$(echo "$$status" | awk '$$1 == "Internal" && $$2 == "Hostname" && $$3 == "Named" { print $$4; exit }')"; \
	case "$$state" in pending|running) ;; *) echo "The Ray head job $(RAY_HEAD_JOB) is $${state:-unknown}: run make ray-head first." >&2; exit 1;; esac; \
	test -n "$$host" || { echo "apolo status $(RAY_HEAD_JOB) shows no Internal Hostname Named: pass RAY_HEAD_HOST=..." >&2; exit 1; }; \
	echo "$$host:$(RAY_PORT)"

# Internal: marks that `$(PIP) install -e '.[dev]'` ran for the Python environment PYTHON resolves to now (one
# stamp per interpreter path, so a new venv gets its own install); `make clean-local` removes the stamps.
_DEV_STAMP = .make/setup-dev$(subst /,_,$(shell command -v $(PYTHON) 2>/dev/null || echo $(PYTHON))).stamp
_PIP_CONSTRAINTS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

# Internal: the closing line of `make demo` (argv: DEMO_DIR, DEMO_FEATURED, DEMO_N, DEMO_TRAIN_EXTRA): the
# featured held-out phantom's drawn age next to the estimate and the model's measured held-out error; also
# writes DEMO_DIR/summary.json (copy it to docs/demo.json to quote a demo run in the README).
define _DEMO_SUMMARY_PY
import csv, json, os, sys, time
from pathlib import Path
from boneage.clinical import format_age
d, featured, n, extra = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
row = next(r for r in csv.DictReader(open(d / "holdout/labels.csv")) if r["id"] == featured)
drawn, sex = float(row["boneage"]), "boy" if row["male"] in ("True", "1", "true") else "girl"
estimate = float(next(r for r in csv.DictReader(open(d / "reports/predictions.csv"))
                      if r["file"] == featured + ".png")["bone_age_months"])
ev, run = json.loads((d / "eval/metrics.json").read_text()), json.loads((d / "run/metrics.json").read_text())
mae, err, train_s = ev["mae_months"], abs(estimate - drawn), run["elapsed_s"]
verdict = ("within its typical error" if err <= mae else "about its typical error" if err <= 1.5 * mae
           else "far off, beyond its typical error")
print(f"featured: {d}/holdout/images/{featured}.png, a held-out phantom ({sex}) drawn at {format_age(drawn)}: "
      f"estimate {format_age(estimate)}, off by {err:.0f} months ({verdict}); the model's held-out phantom MAE "
      f"is {mae:.1f} months over {ev['n']} phantoms (predicting the mean: {ev['baseline_mae_months']:.1f}) -- a "
      f"demo model trained for {train_s:.0f} s on {run['target']['n_train']} phantoms, nothing about real radiographs")
started = (d / ".started").read_text().strip() if (d / ".started").is_file() else None
summary = {"heldout_mae_months": round(mae, 2), "heldout_rmse_months": round(ev["rmse_months"], 2),
           "baseline_mae_months": round(ev["baseline_mae_months"], 2), "n_heldout": ev["n"],
           "n_train": run["target"]["n_train"], "n_valid": run["target"]["n_valid"],
           "epochs_done": run["epochs_done"], "train_s": round(train_s, 1),
           "total_s": round(time.time() - float(started), 1) if started else None,
           "featured": {"id": featured, "drawn_months": drawn, "estimate_months": round(estimate, 2)},
           "settings": {"DEMO_N": n, "DEMO_TRAIN_EXTRA": extra, "DEMO_FEATURED": featured},
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
(d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
endef
export _DEMO_SUMMARY_PY

.DEFAULT_GOAL := help

##@ Help

.PHONY: help
help: ## List every target with its description
	@awk 'BEGIN {FS = ":.*## "} \
		/^##@ / {printf "\n%s\n", substr($$0, 5); next} \
		/^[a-zA-Z0-9_-]+:.*## / {printf "  %-20s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables (override as make TARGET NAME=value): see docs/platform.md or the top of the Makefile."

##@ Platform: environment

.PHONY: setup
setup: upload-code ## Build the project image CUSTOM_ENV on the platform (start job, install, save)
	$(APOLO) kill $(SETUP_JOB) >/dev/null 2>&1 || true
	$(APOLO) mkdir --parents $(PROJECT_STORAGE)
	$(APOLO) cp --update --target-directory $(PROJECT_STORAGE) $(PROJECT_FILES)
	$(APOLO) run \
		--name $(SETUP_JOB) \
		--preset $(SETUP_PRESET) \
		--detach \
		--life-span $(SETUP_LIFE_SPAN) \
		--tag $(JOB_TAG) \
		--volume $(PROJECT_STORAGE):$(PROJECT_MOUNT):ro \
		$(BASE_IMAGE) \
		-- sleep infinity
	$(APOLO) exec --no-tty $(SETUP_JOB) -- bash -c '$(_SETUP_APT)'
	$(APOLO) exec --no-tty $(SETUP_JOB) -- bash -c '$(_SETUP_PIP)'
	$(APOLO) $(SAVE_OPTIONS) job save $(SETUP_JOB) $(CUSTOM_ENV)
	$(APOLO) kill $(SETUP_JOB)

.PHONY: image
image: ## Build the Dockerfile on the platform into CUSTOM_ENV (apolo-flow build, .apolo/live.yml images)
	$(APOLO_FLOW) build boneage

.PHONY: image-local
image-local: ## Build the Dockerfile with a local Docker into LOCAL_IMAGE (torch from IMAGE_TORCH_INDEX)
	$(DOCKER) build --tag $(LOCAL_IMAGE) --build-arg TORCH_INDEX_URL=$(IMAGE_TORCH_INDEX) .

.PHONY: kill-setup
kill-setup: ## Terminate the setup job (left running when setup fails half-way)
	-$(APOLO) kill $(SETUP_JOB)

##@ Platform: storage

.PHONY: upload-code
upload-code: ## Upload src/ to CODE_STORAGE (jobs mount it read-only and import it first)
	$(APOLO) mkdir --parents $(CODE_STORAGE)
	$(APOLO) cp --recursive --update --no-target-directory $(CODE_EXCLUDE) $(CODE_DIR) $(CODE_STORAGE)

.PHONY: upload-data
upload-data: ## Upload local DATA_DIR (IMAGES_SUBDIR/ + LABELS_FILE) to DATA_STORAGE; refuses a folder lacking either
	@test -d $(DATA_DIR) || { echo "DATA_DIR=$(DATA_DIR) is not a folder: put $(IMAGES_SUBDIR)/ and $(LABELS_FILE) there or pass DATA_DIR=..." >&2; exit 1; }
	@missing=""; \
	test -n "$$(ls -A "$(DATA_DIR)/$(IMAGES_SUBDIR)" 2>/dev/null)" || missing="the images folder $(DATA_DIR)/$(IMAGES_SUBDIR)/ (absent or empty)"; \
	test -f "$(DATA_DIR)/$(LABELS_FILE)" || missing="$${missing:+$$missing and }the labels file $(DATA_DIR)/$(LABELS_FILE)"; \
	if [ -n "$$missing" ]; then echo "upload-data: nothing uploaded: DATA_DIR=$(DATA_DIR) lacks $$missing. Put \
	$(IMAGES_SUBDIR)/<id>.png and $(LABELS_FILE) (id,boneage,male) there (boneage download --out $(DATA_DIR) does), pass \
	DATA_DIR=..., or fetch the data on the platform with make download-data." >&2; exit 1; fi
	$(APOLO) mkdir --parents $(DATA_STORAGE)
	$(APOLO) cp --recursive --update --no-target-directory $(DATA_DIR) $(DATA_STORAGE)

.PHONY: download-data
download-data: upload-code ## Fetch the RSNA data from Kaggle into DATA_STORAGE in a platform job (token from Apolo secrets)
	$(APOLO) mkdir --parents $(DATA_STORAGE)
	$(APOLO) run \
		--name $(DOWNLOAD_JOB) \
		--preset $(DOWNLOAD_PRESET) \
		--detach \
		--restart never \
		--life-span $(DOWNLOAD_LIFE_SPAN) \
		--tag $(JOB_TAG) \
		--volume $(CODE_STORAGE):$(CODE_MOUNT):ro \
		--volume $(DATA_STORAGE):$(DATA_MOUNT):rw \
		--env PYTHONPATH=$(CODE_MOUNT) \
		--env KAGGLE_USERNAME=secret:$(KAGGLE_USERNAME_SECRET) \
		--env KAGGLE_KEY=secret:$(KAGGLE_KEY_SECRET) \
		--workdir $(PROJECT_MOUNT) \
		$(CUSTOM_ENV) \
		-- bash -c 'set -e; python -m pip show -q kaggle >/dev/null 2>&1 || python -m pip install --progress-bar=off \
		--no-cache-dir "$(KAGGLE_PACKAGE)"; boneage download --out $(DATA_MOUNT)'
	@echo "Follow it with: $(APOLO) logs $(DOWNLOAD_JOB); it writes $(DATA_STORAGE)/$(IMAGES_SUBDIR)/ and $(LABELS_FILE)."

.PHONY: upload-notebooks
upload-notebooks: ## Upload notebooks/ to NOTEBOOKS_STORAGE
	$(APOLO) mkdir --parents $(NOTEBOOKS_STORAGE)
	$(APOLO) cp --recursive --update --no-target-directory $(NOTEBOOKS_DIR) $(NOTEBOOKS_STORAGE)

.PHONY: upload
upload: upload-code upload-notebooks ## Upload code and notebooks

.PHONY: download-notebooks
download-notebooks: ## Download NOTEBOOKS_STORAGE into notebooks/ (newer files only)
	$(APOLO) cp --recursive --update --no-target-directory $(NOTEBOOKS_STORAGE) $(NOTEBOOKS_DIR)

.PHONY: download-results
download-results: ## Download RESULTS_STORAGE (runs, checkpoints, logs) into RESULTS_DIR
	$(APOLO) cp --recursive --update --no-target-directory $(RESULTS_STORAGE) $(RESULTS_DIR)

.PHONY: clean-code
clean-code: ## Delete the code from platform storage
	$(APOLO) rm --recursive $(CODE_STORAGE)

.PHONY: clean-data
clean-data: ## Delete the data from platform storage
	$(APOLO) rm --recursive $(DATA_STORAGE)

.PHONY: clean-notebooks
clean-notebooks: ## Delete the notebooks from platform storage
	$(APOLO) rm --recursive $(NOTEBOOKS_STORAGE)

.PHONY: clean-results
clean-results: ## Delete ALL training runs and checkpoints from platform storage
	$(APOLO) rm --recursive $(RESULTS_STORAGE)

##@ Platform: jobs

.PHONY: check-data
check-data: upload-code ## Check DATA_STORAGE (images, labels, every row) and the GPU on TRAINING_PRESET, in a job that never restarts
	$(APOLO) mkdir --parents $(DATA_STORAGE)
	$(call _DATA_CHECK_RUN,$(TRAINING_PRESET),$(if $(filter gpu,$(TRAINING_ENGINE)),--gpu))

.PHONY: training
training: check-data ## Train CONFIG (default lite0-gpu) on a TRAINING_PRESET GPU once the data check passes; resumes after preemption
	$(call _TRAINING_RUN,$(TRAINING_JOB),$(TRAINING_PRESET),$(RUN_NAME),--engine $(TRAINING_ENGINE))
	@echo "Follow it with: $(APOLO) logs $(TRAINING_JOB)   (or make logs-training)"

.PHONY: training-ddp
training-ddp: upload-code ## Train CONFIG with DDP on DDP_GPUS GPUs of DDP_PRESET once the data check passes; resumes too
	$(APOLO) mkdir --parents $(DATA_STORAGE)
	$(call _DATA_CHECK_RUN,$(DDP_PRESET),--gpu)
	$(call _TRAINING_RUN,$(TRAINING_DDP_JOB),$(DDP_PRESET),$(DDP_RUN_NAME),--engine ddp --ddp-workers $(DDP_GPUS))
	@echo "Follow it with: $(APOLO) logs $(TRAINING_DDP_JOB)"

.PHONY: logs-training
logs-training: ## Print and follow the training job's logs
	$(APOLO) logs $(TRAINING_JOB)

.PHONY: connect-training
connect-training: ## Open a shell inside the running training job
	$(APOLO) exec $(TRAINING_JOB) -- bash

.PHONY: kill-training
kill-training: ## Terminate the training job
	-$(APOLO) kill $(TRAINING_JOB)

.PHONY: kill-training-ddp
kill-training-ddp: ## Terminate the DDP training job
	-$(APOLO) kill $(TRAINING_DDP_JOB)

.PHONY: jupyter
jupyter: upload-code upload-notebooks ## Start JupyterLab on JUPYTER_PRESET (the demo notebook reads DATA_STORAGE)
	$(APOLO) mkdir --parents $(DATA_STORAGE) $(RESULTS_STORAGE)
	$(APOLO) run \
		--name $(JUPYTER_JOB) \
		--preset $(JUPYTER_PRESET) \
		--http-port 8888 \
		$(HTTP_AUTH) \
		--browse \
		--detach \
		--tag $(JOB_TAG) \
		--volume $(CODE_STORAGE):$(CODE_MOUNT):ro \
		--volume $(DATA_STORAGE):$(DATA_MOUNT):ro \
		--volume $(NOTEBOOKS_STORAGE):$(NOTEBOOKS_MOUNT):rw \
		--volume $(RESULTS_STORAGE):$(RESULTS_MOUNT):rw \
		--env PYTHONPATH=$(CODE_MOUNT) \
		--env BONEAGE_DATA_DIR=$(DATA_MOUNT) \
		--env BONEAGE_NB_OUT=$(RESULTS_MOUNT)/notebook \
		--workdir $(PROJECT_MOUNT) \
		$(CUSTOM_ENV) \
		-- jupyter lab \
			--no-browser \
			--ip=0.0.0.0 \
			--port=8888 \
			--allow-root \
			--IdentityProvider.token= \
			--ServerApp.root_dir=$(PROJECT_MOUNT)

.PHONY: kill-jupyter
kill-jupyter: ## Terminate the Jupyter job (run download-notebooks first to keep edits locally)
	-$(APOLO) kill $(JUPYTER_JOB)

.PHONY: tensorboard
tensorboard: ## Start TensorBoard over RESULTS_STORAGE and open it in the browser
	$(APOLO) run \
		--name $(TENSORBOARD_JOB) \
		--preset $(TENSORBOARD_PRESET) \
		--http-port 6006 \
		$(HTTP_AUTH) \
		--browse \
		--detach \
		--tag $(JOB_TAG) \
		--volume $(RESULTS_STORAGE):$(RESULTS_MOUNT):ro \
		$(CUSTOM_ENV) \
		-- tensorboard --host=0.0.0.0 --port=6006 --logdir=$(RESULTS_MOUNT)

.PHONY: kill-tensorboard
kill-tensorboard: ## Terminate the TensorBoard job
	-$(APOLO) kill $(TENSORBOARD_JOB)

.PHONY: filebrowser
filebrowser: ## Start File Browser over PROJECT_STORAGE and open it in the browser
	$(APOLO) run \
		--name $(FILEBROWSER_JOB) \
		--preset $(FILEBROWSER_PRESET) \
		--http-port 80 \
		$(HTTP_AUTH) \
		--browse \
		--detach \
		--tag $(JOB_TAG) \
		--volume $(PROJECT_STORAGE):/srv:rw \
		$(FILEBROWSER_IMAGE) \
		-- --noauth --address=0.0.0.0 --port=80 --root=/srv --database=/tmp/filebrowser.db

.PHONY: kill-filebrowser
kill-filebrowser: ## Terminate the File Browser job
	-$(APOLO) kill $(FILEBROWSER_JOB)

.PHONY: ps
ps: ## List this project's running and pending jobs (tagged JOB_TAG)
	$(APOLO) ps --tag $(JOB_TAG)

.PHONY: kill
kill: ## Terminate all of this project's jobs (every running or pending job tagged JOB_TAG)
	@ids="$$($(APOLO) -q ps --tag $(JOB_TAG))" || exit 1; \
	if [ -n "$$ids" ]; then echo "$(APOLO) kill" $$ids; $(APOLO) kill $$ids; \
	else echo "No running or pending jobs tagged $(JOB_TAG)."; fi

##@ Platform: Ray cluster (boneage predict --engine ray; see docs/platform.md)

.PHONY: ray-head
ray-head: upload-code ## Start the Ray head job RAY_HEAD_JOB on RAY_PRESET (a new auth token in RAY_TOKEN_SECRET)
	@state="$$($(APOLO) status $(RAY_HEAD_JOB) 2>/dev/null | awk '$$1 == "Status" { print $$2; exit }')"; \
	case "$$state" in pending|running) echo "The Ray head job $(RAY_HEAD_JOB) is already $$state (a new token would \
	lock its new workers out): make ray-kill first." >&2; exit 1;; esac; \
	umask 077; token="$$(mktemp)" || exit 1; trap 'rm -f "$$token"' EXIT; \
	od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$$token" && test -s "$$token" || exit 1; \
	echo "$(APOLO) secret add $(RAY_TOKEN_SECRET) @<a new random token>"; \
	$(APOLO) secret add $(RAY_TOKEN_SECRET) "@$$token"
	$(call _RAY_RUN,$(RAY_HEAD_JOB),$(RAY_PRESET),ro,--tag $(RAY_TAG),$(_RAY_HEAD_SCRIPT))
	@echo "Next: make ray-workers RAY_WORKERS=N, then make predict-archive ARCHIVE=storage:... (the same ARCHIVE)."

.PHONY: ray-workers
ray-workers: ## Start RAY_WORKERS Ray worker jobs on RAY_WORKER_PRESET that join the RAY_HEAD_JOB cluster
	@case "$(RAY_WORKERS)" in ''|*[!0-9]*|0) echo "RAY_WORKERS=$(RAY_WORKERS) is no positive number" >&2; exit 1;; esac; \
	addr="$$($(_RAY_HEAD_LOOKUP))" || exit 1; \
	echo "Ray head: $$addr"; \
	for i in $$(seq 1 $(RAY_WORKERS)); do \
		echo "$(APOLO) run --name $(RAY_WORKER_JOB)-$$i ... $(CUSTOM_ENV) -- ... ray start --address=$$addr --block"; \
		$(call _RAY_RUN,$(RAY_WORKER_JOB)-$$i,$(RAY_WORKER_PRESET),ro,--tag $(RAY_TAG) --env RAY_HEAD_ADDRESS=$$addr,$(_RAY_WORKER_SCRIPT)) \
		|| exit 1; \
	done

.PHONY: predict-archive
predict-archive: ## Score ARCHIVE with PREDICT_CHECKPOINT on the Ray cluster (a driver job) into RESULTS_STORAGE/PREDICT_OUT
	@addr="$$($(_RAY_HEAD_LOOKUP))" || exit 1; \
	echo "Ray head: $$addr"; \
	echo "$(APOLO) run --name $(PREDICT_ARCHIVE_JOB) ... -- ... boneage predict $(ARCHIVE_MOUNT) --engine ray ..."; \
	$(call _RAY_RUN,$(PREDICT_ARCHIVE_JOB),$(PREDICT_PRESET),rw,--env RAY_HEAD_ADDRESS=$$addr,$(_RAY_DRIVER_SCRIPT))
	@echo "Follow it with: $(APOLO) logs $(PREDICT_ARCHIVE_JOB); the table lands in $(RESULTS_STORAGE)/$(PREDICT_OUT)"

.PHONY: ray-kill
ray-kill: ## Terminate the Ray head and workers (every running or pending job tagged RAY_TAG)
	@ids="$$($(APOLO) -q ps --tag $(RAY_TAG))" || exit 1; \
	if [ -n "$$ids" ]; then echo "$(APOLO) kill" $$ids; $(APOLO) kill $$ids; \
	else echo "No running or pending jobs tagged $(RAY_TAG)."; fi

##@ Local

.PHONY: setup-local
setup-local: ## Install torch (TORCH_PACKAGES), then boneage with all extras pinned by CONSTRAINTS, into PYTHON
	@echo "System packages (Debian/Ubuntu), if missing: sudo apt-get install $$(grep -v '^ *#' apt.txt | xargs)"
	$(PIP) install $(TORCH_PIP_OPTIONS) $(TORCH_PACKAGES)
	$(PIP) install $(_PIP_CONSTRAINTS) -e '.[all]'

# The test tools ([dev] extra, pinned by CONSTRAINTS), installed once per environment and again when
# pyproject.toml or the constraints change; `test` and `lint` depend on it.
$(_DEV_STAMP): pyproject.toml $(CONSTRAINTS)
	$(PIP) install $(_PIP_CONSTRAINTS) -e '.[dev]'
	@mkdir -p $(@D) && touch $@

.PHONY: lock-dev
lock-dev: ## Rewrite requirements-dev.txt from PYTHON's environment (pip freeze); see docs/development.md, "Pinned versions"
	@{ echo "# Exact versions of a green 'make test' (pip constraints: make setup-local / make test install with -c)."; \
	  echo "# Regenerate with 'make lock-dev' in a fresh venv; see docs/development.md, section 'Pinned versions'."; \
	  $(PIP) freeze --exclude-editable | grep -v -i -E '^boneage(==| @)'; } > requirements-dev.txt.tmp
	mv requirements-dev.txt.tmp requirements-dev.txt

.PHONY: train-local
train-local: ## Train CONFIG locally on DATA_DIR into RESULTS_DIR/RUN_NAME (resumes like the platform job)
	$(BONEAGE) train \
		--config $(CONFIG) \
		--images $(DATA_DIR)/$(IMAGES_SUBDIR) \
		--labels $(DATA_DIR)/$(LABELS_FILE) \
		--out $(RESULTS_DIR)/$(RUN_NAME) \
		--resume \
		$(TRAIN_EXTRA)

.PHONY: jupyter-local
jupyter-local: ## Start JupyterLab locally in notebooks/
	$(PYTHON) -m jupyterlab --notebook-dir=$(NOTEBOOKS_DIR) --port=$(JUPYTER_PORT)

.PHONY: tensorboard-local
tensorboard-local: ## Start TensorBoard locally over RESULTS_DIR
	tensorboard --logdir=$(RESULTS_DIR) --port=$(TENSORBOARD_PORT)

.PHONY: demo
demo: ## Synthetic phantoms -> train cpu-small -> evaluate on held-out phantoms -> a report, in DEMO_DIR (CPU)
	@echo "== DEMO on synthetic phantoms: these numbers say the pipeline works, nothing about real radiographs =="
	rm -rf $(DEMO_DIR)/run $(DEMO_DIR)/eval $(DEMO_DIR)/reports $(DEMO_DIR)/summary.json
	@mkdir -p $(DEMO_DIR) && date +%s > $(DEMO_DIR)/.started
	$(BONEAGE) synth --out $(DEMO_DIR)/phantoms --n $(DEMO_N) --seed 0
	$(BONEAGE) synth --out $(DEMO_DIR)/holdout --n $$(( $(DEMO_N) / 4 )) --seed 1
	$(BONEAGE) train \
		--config cpu-small \
		--images $(DEMO_DIR)/phantoms/images \
		--labels $(DEMO_DIR)/phantoms/labels.csv \
		--out $(DEMO_DIR)/run \
		$(DEMO_TRAIN_EXTRA)
	$(BONEAGE) evaluate \
		--checkpoint $(DEMO_DIR)/run/best.pt \
		--images $(DEMO_DIR)/holdout/images \
		--labels $(DEMO_DIR)/holdout/labels.csv \
		--out $(DEMO_DIR)/eval
	@echo "== featured held-out phantom $(DEMO_FEATURED): chronological age and sex = its drawn age and sex (holdout/labels.csv) =="
	set -- $$(awk -F, '$$1 == "$(DEMO_FEATURED)" { print $$2, ($$3 ~ /^(True|true|1)$$/ ? "M" : "F") }' \
		$(DEMO_DIR)/holdout/labels.csv); test $$# -eq 2 \
		|| { echo "DEMO_FEATURED=$(DEMO_FEATURED) is no id of $(DEMO_DIR)/holdout/labels.csv" >&2; exit 1; }; \
	$(BONEAGE) predict $(DEMO_DIR)/holdout/images/$(DEMO_FEATURED).png \
		--checkpoint $(DEMO_DIR)/run/best.pt --sex $$2 --chronological-age $${1}m \
		--out $(DEMO_DIR)/reports
	@$(PYTHON) -c "$$_DEMO_SUMMARY_PY" $(DEMO_DIR) $(DEMO_FEATURED) $(DEMO_N) "$(DEMO_TRAIN_EXTRA)"
	@echo "== DEMO done (synthetic phantoms): metrics in $(DEMO_DIR)/eval/metrics.json, report in $(DEMO_DIR)/reports, summary in $(DEMO_DIR)/summary.json =="

.PHONY: test
test: $(_DEV_STAMP) ## Run the test suite (installs the [dev] test tools into PYTHON's environment first, once)
	$(PYTHON) -m pytest -q

.PHONY: lint
lint: $(_DEV_STAMP) ## flake8 on src and tests, mypy on src
	$(PYTHON) -m flake8 src tests
	$(PYTHON) -m mypy src

.PHONY: docs
docs: $(_DEV_STAMP) ## Build the documentation site into site/ (MkDocs, --strict: a broken link fails)
	$(PYTHON) -m mkdocs build --strict

.PHONY: bench
bench: ## Run the benchmarks
	$(PYTHON) -m benchmarks.run

.PHONY: bench-quick
bench-quick: ## Run the quick benchmarks
	$(PYTHON) -m benchmarks.run --quick

.PHONY: bench-serve
bench-serve: ## Load-test the web service
	$(PYTHON) -m benchmarks.serve_load

.PHONY: bench-ood
bench-ood: ## Out-of-distribution refusal: false refusals (held-out split) and non-hand refusals of OOD_CHECKPOINT
	$(PYTHON) -m benchmarks.ood --checkpoint $(OOD_CHECKPOINT)

.PHONY: gpu-recipe-pack
gpu-recipe-pack: ## Pack the shared sample (WebP), fp16 weights and wheels into .gpu/ for the GPU run; print its device command
	$(PYTHON) -m benchmarks.gpu_recipe pack
	bash benchmarks/gpu_recipe/device.sh

.PHONY: screenshots
screenshots: ## Regenerate docs/sample_report.html, img/sample_report.png, img/serve_page.png (after make demo)
	$(PYTHON) docs/screenshots.py --demo-dir $(DEMO_DIR) --featured $(DEMO_FEATURED)

.PHONY: notebook-html
notebook-html: ## Execute NOTEBOOK and write NOTEBOOK_OUT/demo.html
	$(PYTHON) -m nbconvert --to html --execute --ExecutePreprocessor.timeout=1200 \
		--output-dir $(NOTEBOOK_OUT) --output $(basename $(notdir $(NOTEBOOK))) $(NOTEBOOK)

.PHONY: clean-local
clean-local: ## Delete local demo/notebook outputs, tool caches and install stamps (keeps RESULTS_DIR and data)
	rm -rf $(DEMO_DIR) $(NOTEBOOK_OUT) .pytest_cache .mypy_cache .hypothesis .make
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
