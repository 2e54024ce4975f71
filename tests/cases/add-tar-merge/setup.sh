mkdir -p payload/dir
echo new-one > payload/dir/one.txt
echo added > payload/dir/added.txt
tar -C payload -cf - dir | gzip -n > arch.tar.gz
cp arch.tar.gz disguised.bin
echo "just text, not gzip" > notatar.tar.gz
mkdir r && echo r > r/r.txt && tar -C r -cf relative.tar ./r.txt && rm -rf r payload
