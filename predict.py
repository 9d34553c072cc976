"""Classify new photos with a trained model (the same command as `crack-predict`).

python predict.py ckpt_path=RUN/checkpoints/best.ckpt inputs=[a.jpg,dir,"photos/*.png"] output=p.csv
python predict.py ckpt_path=... inputs=[labelled_dir] mode=eval
python predict.py ckpt_path=... inputs=[big_photo.jpg] mode=scan
"""

from crack_lightning.commands.predict import predict

if __name__ == "__main__":
    predict()
