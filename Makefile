# The two commands a newcomer runs (README.md): `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,fid]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded photos (CPU, a few minutes): train the demo KL-VAE -> export it to diffusers ->
# encode the photos into latent shards -> evaluate (PSNR/SSIM/ST-LPIPS report). Starts afresh in runs/demo-kl.
LAUNCH := $(BIN)/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
demo: $(STAMP)
	rm -rf runs/demo-kl
	$(LAUNCH) train/vae.py --config configs/demo-kl.yaml output_dir=runs/demo-kl
	$(BIN)/ldtok encode --model runs/demo-kl/final --out runs/demo-kl/latents --data-source default --resolution 64 \
		--write-scaling-factor
	$(BIN)/ldtok verify runs/demo-kl/latents
	$(BIN)/ldtok eval --model runs/demo-kl/final --out runs/demo-kl/eval --data-source default --split validation \
		--resolution 64 --perceptual stlpips-alex --fid off

# The suite on TEST_WORKERS pytest-xdist processes (one torch thread each); `make test TEST_WORKERS=0` runs it in
# this process. loadfile: a file's tests stay on one worker, so its module fixtures (trained models) are built once.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check tokenizers train eval tests

clean:
	rm -rf runs .pytest_cache
