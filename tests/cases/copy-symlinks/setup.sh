mkdir -p tree/sub
echo f > file.txt
echo t > tree/sub/t.txt
ln -s sub/t.txt tree/rel-link
ln -s /etc/passwd tree/abs-link
ln -s sub tree/rel-dir-link
ln -s nowhere tree/dangling
ln -s file.txt link-to-file
