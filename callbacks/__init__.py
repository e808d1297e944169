"""Writers as Lightning callbacks: what a run leaves behind (the merge side's report files, its W&B
table and figures, the per-task exports of a merged model), apart from what the LightningModules compute."""
