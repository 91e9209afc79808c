"""`BuildConfig`: the settings of `sparsekd build-cache`, one section per stage.

Each section is declared with its stage (`teacher.TeacherConfig`, `corpus.CorpusConfig`,
`encoder.EncoderConfig`, `writer.WriterConfig`); this module only composes them, so any
helper can import a section without importing the build.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsekd.cache_builder.corpus import CorpusConfig
from sparsekd.cache_builder.encoder import EncoderConfig
from sparsekd.cache_builder.teacher import TeacherConfig
from sparsekd.cache_builder.writer import WriterConfig
from sparsekd.config import check, section, setting


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    teacher: TeacherConfig = section(TeacherConfig, "The teacher and its engine.", required=True)
    corpus: CorpusConfig = section(CorpusConfig, "What to read and how to pack it.")
    encoder: EncoderConfig = section(EncoderConfig, "The sparse view stored per position.")
    writer: WriterConfig = section(WriterConfig, "Where and how shards are written.", required=True)
    seed: int = setting(0, "Seed of the engine and of the sampling uniforms.", flag=True)
    progress: bool = setting(True, "Show a progress bar.", flag="--progress/--quiet")

    def __post_init__(self):
        check(0 <= self.seed < 2**63, f"seed must be in 0..2^63-1, got {self.seed}")
