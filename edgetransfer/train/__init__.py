"""What fine-tuning runs on: the loops an epoch iterates over (:mod:`.loops`: cached features, or
images through the network), domain adaptation during training (:mod:`.adaptation`) and the epoch
loop with its checkpoints and resume state (:mod:`.trainer`). ``edgetransfer.finetune`` opens the
run and drives them."""
