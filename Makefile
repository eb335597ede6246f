# Thin aliases; each target installs what it needs from the package registries.
CARGO ?= cargo
PHOTOS ?=
ARGS ?=
FUZZ_SECS ?= 300

.PHONY: all ort models testdata assets system-deps build run test lint eval web bench soak fuzz clean-assets

all: build

ort:
	./onnx/fetch_ort.sh

models: ort testdata
	./onnx/make_models.sh

testdata:
	./onnx/fetch_testdata.sh

assets: models testdata

# Debian packages the tests drive: Chromium for the demo page, Redis for the scale-out backend.
system-deps:
	@command -v chromium >/dev/null && command -v redis-server >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends chromium redis-server)

build: ort
	$(CARGO) build --release

run: models
	$(CARGO) run --release -- serve $(ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

test: assets system-deps lint
	$(CARGO) test --all-targets

eval: models
	$(CARGO) run --release -- eval --photos $(PHOTOS)

# Rebuilds the committed demo page bundle (web/dist) from web/src and proto/.
web:
	cd web && npm ci --ignore-scripts --no-audit --no-fund && npm run build

# Figures for docs/performance.md: prints a table, writes target/bench/report.json.
bench: models
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y --no-install-recommends wrk)
	$(CARGO) bench --bench proof

# Long fault runs (repeated kill -9 under submissions) and a longer fuzz pass.
soak: assets system-deps
	$(CARGO) test --release --test faults -- --ignored --nocapture
	DESKGEN_FUZZ_SECS=120 $(CARGO) test --release --test fuzz -- --nocapture

fuzz: testdata
	DESKGEN_FUZZ_SECS=$(FUZZ_SECS) $(CARGO) test --release --test fuzz -- --nocapture

clean-assets:
	rm -rf assets
