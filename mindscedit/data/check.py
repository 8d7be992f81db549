"""Find every problem in a dataset without training (``mindscedit check-data``).

Training meets a bad row only when it reaches it, and then skips it (or stops, with
``--on_bad_sample error``). This reads every row, decodes every image and runs it through the
training transform, and reports all problems at once, each as one line naming the row.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from .sources import DataError, load_records
from .transforms import ImageTransform, decode_image, to_rgb

__all__ = ["DataReport", "check_dataset"]


@dataclass
class DataReport:
    num_rows: int = 0
    bad_rows: List[str] = field(default_factory=list)  # rows training would skip
    small_images: List[str] = field(default_factory=list)  # rows training upscales

    @property
    def problems(self) -> List[str]:
        return self.bad_rows + self.small_images

    def summary(self) -> str:
        if not self.problems:
            return f"checked {self.num_rows} rows: no problems"
        parts = []
        if self.bad_rows:
            parts.append(f"{len(self.bad_rows)} bad rows that training skips")
        if self.small_images:
            parts.append(f"{len(self.small_images)} images smaller than the resolution")
        return f"checked {self.num_rows} rows: {len(self.problems)} problems ({', '.join(parts)})"


def check_dataset(
    path: Union[str, Path],
    image_column: str = "image",
    caption_column: str = "text",
    resolution: Optional[int] = None,
) -> DataReport:
    """Check every row of the dataset at ``path``.

    Problems with the dataset as a whole (missing path, unknown layout or column, no rows) raise
    DataError, as they would for training; problems with single rows go into the report.
    """
    report = DataReport()
    records = load_records(
        path, image_column, caption_column, on_bad_record=lambda exc: report.bad_rows.append(str(exc))
    )
    report.num_rows = len(records) + len(report.bad_rows)
    transform = ImageTransform(resolution) if resolution else None
    for record in records:
        try:
            image = decode_image(record.image, record.origin)
            if transform is None:
                to_rgb(image)
                continue
            if min(image.size) < resolution:
                report.small_images.append(
                    f"{record.origin}: image is {image.size[0]}x{image.size[1]}, smaller than the "
                    f"resolution {resolution} (training upscales it)"
                )
            transform(image, np.random.default_rng(0))
        except DataError as exc:
            report.bad_rows.append(str(exc))
        except (OSError, ValueError) as exc:  # as TextImageDataset: a mode PIL cannot convert
            report.bad_rows.append(f"{record.origin}: cannot transform image: {exc}")
    return report
