"""`BuildConfig`: the settings of `sparsekd build-cache`, one section per stage.

Each section is declared with its stage (`teacher.TeacherConfig`, `corpus.CorpusConfig`,
`encoder.EncoderConfig`, `writer.WriterConfig`); this module only composes them, so any
helper can import a section without importing the build.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sparsekd.cache_builder.corpus import CorpusConfig
from sparsekd.cache_builder.encoder import EncoderConfig
from sparsekd.cache_builder.generate import GenerateConfig
from sparsekd.cache_builder.teacher import TeacherConfig
from sparsekd.cache_builder.writer import WriterConfig
from sparsekd.config import check, section, setting


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    teacher: TeacherConfig = section(TeacherConfig, "The teacher and its engine.", required=True)
    corpus: CorpusConfig = section(CorpusConfig, "What to read and how to pack it.")
    encoder: EncoderConfig = section(EncoderConfig, "The sparse view stored per position.")
    writer: WriterConfig = section(WriterConfig, "Where and how shards are written.", required=True)
    generate: GenerateConfig = section(
        GenerateConfig, "The teacher writes the answers (sequence-level KD; docs/generate.md)."
    )
    seed: int = setting(0, "Seed of the engine and of the sampling uniforms.", flag=True)
    progress: bool = setting(True, "Show a progress bar.", flag="--progress/--quiet")

    def __post_init__(self):
        check(0 <= self.seed < 2**63, f"seed must be in 0..2^63-1, got {self.seed}")
        self._check_generate()

    def _check_generate(self) -> None:
        gen, enc = self.generate, self.encoder
        if not gen.enabled:
            changed = [
                f.name
                for f in dataclasses.fields(gen)
                if f.name != "enabled" and getattr(gen, f.name) != f.default
            ]
            check(
                not changed,
                f"generate.{changed[0] if changed else ''} applies with --generate only",
            )
            return
        check(
            self.teacher.engine == "vllm",
            "--generate needs --engine vllm (the hf engine is an oracle; it does not generate)",
        )
        check(self.corpus.kind != "text", "--generate reads prompts, not --set corpus.kind=text")
        check(
            self.corpus.max_sequences is None,
            "--generate with --max-sequences: where the cut falls depends on the answers; "
            "give fewer prompts instead",
        )
        capture = gen.resolved_capture(enc.mode, self.corpus.learn)
        if capture == "during":
            check(
                enc.spec.from_logprobs is not None,
                f"--mode {enc.mode} cannot be captured during generation (vLLM returns the "
                "top-K log-probs of a generated token, not draws from its full distribution): "
                "--set generate.capture=second_pass",
            )
            check(
                enc.path != "hidden",
                "generate.capture=during takes the targets from the generation's log-probs; "
                "--path hidden needs --set generate.capture=second_pass",
            )
            check(
                self.corpus.learn == "assistant",
                "generate.capture=during has targets for the answer only; corpus.learn=all "
                "needs --set generate.capture=second_pass",
            )
            check(
                self.corpus.attention == "document",
                "generate.capture=during takes each answer's targets from its own prompt; "
                "corpus.attention=row would teach them under the other pieces of the row: "
                "--set generate.capture=second_pass",
            )
