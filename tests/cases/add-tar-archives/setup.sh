mkdir -p payload/dir/sub
echo one > payload/dir/one.txt
echo two > payload/dir/sub/two.txt
chmod 0750 payload/dir/sub
chmod 0604 payload/dir/one.txt
ln -s one.txt payload/dir/link
ln payload/dir/one.txt payload/dir/hard
tar -C payload --owner=1234 --group=5678 -cf plain.tar dir
tar -C payload --numeric-owner -cf - dir | gzip -n > arch.tar.gz
tar -C payload -cf - dir | bzip2 > arch.tar.bz2
tar -C payload -cf - dir | xz > arch.tar.xz
cp arch.tar.gz arch.tgz
rm -rf payload
