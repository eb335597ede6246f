# Thin aliases; each target installs what it needs from the package registries.
CARGO ?= cargo
PHOTOS ?=
ARGS ?=

.PHONY: all ort models testdata assets build run test lint eval clean-assets

all: build

ort:
	./onnx/fetch_ort.sh

models: ort testdata
	./onnx/make_models.sh

testdata:
	./onnx/fetch_testdata.sh

assets: models testdata

build: ort
	$(CARGO) build --release

run: models
	$(CARGO) run --release -- serve $(ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

test: assets lint
	$(CARGO) test --all-targets

eval: models
	$(CARGO) run --release -- eval --photos $(PHOTOS)

clean-assets:
	rm -rf assets
