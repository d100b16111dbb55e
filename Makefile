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

# Train the demo KL-VAE on the embedded photos (CPU) -> export to diffusers -> PSNR and a reconstruction grid.
demo: $(STAMP)
	$(BIN)/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train/vae.py --config configs/demo-kl.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

lint: $(STAMP)
	$(BIN)/ruff check tokenizers train eval tests

clean:
	rm -rf runs .pytest_cache
